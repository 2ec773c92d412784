"""Write a pruned model as a standard Hugging Face checkpoint, validated before it is put in place.

The folder is built beside `out_dir`, reloaded with plain transformers and checked, then renamed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.export.logit_check import (
    LogitCheckFailed,
    LogitComparison,
    check_failure,
    compare_logits,
    logits_of,
    probe_ids,
    rounding_noise,
    trained_model_check,
)
from loraprune.export.placement import move_into_place, temporary_folder_beside
from loraprune.export.slicing import merge_lora, slice_model
from loraprune.models import ArchSpec, unwrap
from loraprune.models.loading import drop_quantizer
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks

REPORT_NAME = "loraprune.json"


def export_checkpoint(model: nn.Module, tokenizer, masks: ModelMasks, spec: ArchSpec, report: dict,
                      out_dir: Path, overwrite: bool = False, probe: torch.Tensor | None = None,
                      check_logits: bool = True) -> Path:
    """Merge, slice and save `model` to `out_dir`; consumes the model (it is merged in place).

    ``probe`` (1, tokens) is the text the logits are compared on (real text conditions the check
    far better than random ids); with ``check_logits`` False a failed comparison is only recorded.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LoraPruneError(f"{out_dir} exists; pass --overwrite or choose another --out")
    tmp = temporary_folder_beside(out_dir)
    try:
        model.eval()
        shape = LayerShape.from_config(unwrap(model).config)
        dtype = unwrap(model).dtype
        probe = probe if probe is not None else probe_ids(unwrap(model).config.vocab_size)
        # The reference is the model as it was trained and evaluated: masked, adapters on, in its
        # own arithmetic (a quantised base included), which also sets the rounding floor.
        masks.attach(model, spec)
        adapted = logits_of(model, probe)
        rounding = rounding_noise(model, probe, reference=adapted)
        masks.detach()
        merged = merge_lora(model)
        masks.attach(merged, spec)
        merged_logits = logits_of(merged, probe)
        masks.detach()
        params_before = merged.num_parameters()
        source_architecture = type(merged).__name__
        sliced = slice_model(merged, masks, spec)
        drop_quantizer(sliced)
        sliced.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        summary = _export_summary(sliced, masks, shape, source_architecture, params_before)
        exported = logits_of(reload_checkpoint(tmp, summary, dtype), probe)
        check = logit_check(exported, merged_logits, adapted, rounding, probe)
        full_report = {**report, "export": {**summary, "logit_check": check}}
        (tmp / REPORT_NAME).write_text(json.dumps(full_report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(full_report))
        if check_logits and not check["passed"]:
            raise LogitCheckFailed(check_failure("the exported model's logits", check, "Please report this"))
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def logit_check(exported: torch.Tensor, merged: torch.Tensor, adapted: torch.Tensor, rounding: LogitComparison,
                probe: torch.Tensor) -> dict:
    """The exported model against the trained one; merge and slicing drift reported on their own."""
    check = trained_model_check(exported, adapted, {"rounding_noise": rounding})
    return {"probe_tokens": int(probe.numel()), **check, "slicing": compare_logits(exported, merged).to_dict(),
            "merge": compare_logits(merged, adapted).to_dict()}


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


def _export_summary(model: PreTrainedModel, masks: ModelMasks, shape: LayerShape,
                    source_architecture: str, params_before: int) -> dict:
    """What export adds to the engine's report."""
    return {
        "architecture": type(model).__name__,
        "source_architecture": source_architecture,
        "config": config_widths(model.config),
        "parameters_before": params_before,
        "parameters_after": model.num_parameters(),
        "layers": [{"heads": int(m.heads.sum()), "kv_heads": int(m.kv_heads(shape).sum()),
                    "ffn": int(m.ffn.sum()),
                    "heads_kept": m.heads.nonzero().flatten().tolist(),
                    "ffn_kept": m.ffn.nonzero().flatten().tolist()}
                   for m in masks.layers],
    }
