"""The one Hugging Face writer: a plain Llama-family folder when every layer keeps the same widths.

The folder is reloaded with plain transformers and its logits handed to the shared check (export/writer.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.export.logit_check import compare_logits, logits_of
from loraprune.export.slicing import slice_model
from loraprune.export.writer import (
    REPORT_NAME,
    ExportRequest,
    ExportWriter,
    TrainedLogits,
    WrittenModel,
    layers_report,
    register_writer,
)
from loraprune.models.loading import drop_quantizer
from loraprune.pruning.groups import LayerShape


@register_writer("transformers")
class TransformersWriter(ExportWriter):
    """A standard checkpoint that plain transformers loads."""

    def write(self, merged: PreTrainedModel, request: ExportRequest, reference: TrainedLogits,
              folder: Path) -> WrittenModel:
        """Slice to one width, save, reload with plain transformers."""
        shape = request.shape
        sliced = slice_model(merged, request.masks, request.spec)
        drop_quantizer(sliced)
        sliced.save_pretrained(folder, safe_serialization=True)
        if request.tokenizer is not None:
            request.tokenizer.save_pretrained(folder)
        summary = {"format": "transformers", "architecture": type(sliced).__name__,
                   "config": config_widths(sliced.config), "parameters_after": sliced.num_parameters(),
                   "layers": layers_report(request.masks, shape)}
        exported = logits_of(reload_checkpoint(folder, summary, reference.dtype), reference.probe)
        slicing = compare_logits(exported, reference.merged)
        return WrittenModel(summary, exported, comparisons={"slicing": slicing.to_dict()})

    def model_card(self, report: dict) -> str:
        """What was pruned, how much, how to load it."""
        return model_card(report)


def reload_checkpoint(folder: Path, summary: dict, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Reload `folder` with plain transformers and check its widths and size."""
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as e:  # transformers raises many types for an unloadable folder
        raise LoraPruneError(f"the exported checkpoint does not reload ({e}); "
                             "please report this with the run's loraprune.json") from e
    reloaded.eval()
    widths = config_widths(reloaded.config)
    if widths != summary["config"]:
        raise LoraPruneError(f"reloaded config widths {widths} differ from the sliced "
                             f"{summary['config']}; please report this")
    if reloaded.num_parameters() != summary["parameters_after"]:
        raise LoraPruneError(f"reloaded model has {reloaded.num_parameters()} parameters, expected "
                             f"{summary['parameters_after']}; please report this")
    return reloaded


def config_widths(config) -> dict[str, int]:
    """The widths of a decoder config that pruning changes."""
    return {
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": LayerShape.from_config(config).head_dim,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
    }


def model_card(report: dict) -> str:
    """A short README.md: what was pruned, how much, how to load it."""
    export = report["export"]
    removed = 1 - export["parameters_after"] / export["parameters_before"]
    widths = export["config"]
    source = report.get("source_model", "the source model")
    return (
        f"# Pruned with loraprune\n\n"
        f"Structured pruning of {source} with LoRAPrune (LoRA-guided, Zhang et al. 2024): whole "
        f"attention heads and FFN channels were removed and the LoRA weights merged.\n\n"
        f"- parameters: {export['parameters_before']:,} -> {export['parameters_after']:,} "
        f"({removed:.1%} removed)\n"
        f"- per layer: {widths['num_attention_heads']} query heads, "
        f"{widths['num_key_value_heads']} key/value heads of dim {widths['head_dim']}, "
        f"{widths['intermediate_size']} FFN channels\n"
        f"- architecture: {export['architecture']} (from {export['source_architecture']})\n\n"
        "Load it with plain transformers, no loraprune needed:\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
        "```\n\n"
        f"The full run report is in `{REPORT_NAME}`.\n"
    )
