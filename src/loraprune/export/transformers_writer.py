"""The one Hugging Face writer: a plain Llama-family folder, or a DeciLM folder for per-layer widths.

Every layer the same: the model is sliced and saved as its own architecture, reloaded with plain transformers.
Layers of different widths (and --format nemotron-nas): a Nemotron-NAS (DeciLM) folder that ships its
modeling code (nemotron_nas_folder.py), read back with that code. The shared check is export/writer.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.export import nemotron_nas_folder
from loraprune.export.logit_check import compare_logits, logits_of
from loraprune.export.nemotron_nas_reader import load_decilm
from loraprune.export.slicing import layers_report, slice_model, uniform_widths
from loraprune.export.writer import (
    REPORT_NAME,
    ExportRequest,
    ExportWriter,
    TrainedLogits,
    WrittenModel,
    register_writer,
)
from loraprune.models import unwrap
from loraprune.models.loading import drop_quantizer
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks


@register_writer("transformers")
class TransformersWriter(ExportWriter):
    """A folder transformers loads: plain when one config holds every layer, else DeciLM."""

    always_decilm: ClassVar[bool] = False

    def writes_decilm(self, request: ExportRequest) -> bool:
        """Whether the masks need (or the format asks for) a DeciLM folder."""
        return self.always_decilm or not has_uniform_widths(request.masks, request.shape)

    def refuse(self, request: ExportRequest) -> None:
        """A DeciLM folder holds Llama-style models without biases, and at least one attention layer."""
        if self.writes_decilm(request):
            nemotron_nas_folder.checked_layouts(unwrap(request.model).config, request.masks, request.shape)

    def write(self, merged: PreTrainedModel, request: ExportRequest, reference: TrainedLogits,
              folder: Path) -> WrittenModel:
        """Write the folder and read it back as its users will."""
        if self.writes_decilm(request):
            summary = nemotron_nas_folder.write_folder(folder, merged, request.masks, request.spec,
                                                       request.tokenizer)
            written = load_decilm(folder, merged.dtype)
        else:
            summary = write_plain_folder(folder, merged, request)
            written = reload_checkpoint(folder, summary, reference.dtype)
        exported = logits_of(written, reference.probe)
        slicing = compare_logits(exported, reference.merged)
        return WrittenModel(summary, exported, comparisons={"slicing": slicing.to_dict()})

    def model_card(self, report: dict) -> str:
        """What was pruned, how much, how to load it."""
        if report["export"]["format"] == nemotron_nas_folder.FORMAT_NAME:
            return nemotron_nas_folder.model_card(report)
        return model_card(report)


@register_writer("nemotron-nas")
class NemotronNasWriter(TransformersWriter):
    """Always the DeciLM folder, uniform masks too: what vLLM loads as DeciLMForCausalLM."""

    always_decilm = True


def has_uniform_widths(masks: ModelMasks, shape: LayerShape) -> bool:
    """Whether one plain Llama config holds every layer: the same widths everywhere, none zero."""
    try:
        uniform_widths(masks, shape)
    except LoraPruneError:  # its checks are the definition; per-layer widths go to a DeciLM folder
        return False
    return True


def write_plain_folder(folder: Path, merged: PreTrainedModel, request: ExportRequest) -> dict:
    """Slice to one width and save as the model's own architecture; returns the report's export part."""
    sliced = slice_model(merged, request.masks, request.spec)
    drop_quantizer(sliced)
    sliced.save_pretrained(folder, safe_serialization=True)
    if request.tokenizer is not None:
        request.tokenizer.save_pretrained(folder)
    return {"format": "transformers", "architecture": type(sliced).__name__, "config": config_widths(sliced.config),
            "parameters_after": sliced.num_parameters(), "layers": layers_report(request.masks, request.shape)}


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
