"""Write a pruned model as a standard Hugging Face checkpoint, validated before it is put in place.

The folder is built beside `out_dir`, reloaded with plain transformers and checked, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.export.slicing import merge_lora, slice_model
from loraprune.models import ArchSpec, unwrap
from loraprune.models.loading import drop_quantizer
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks

REPORT_NAME = "loraprune.json"
# Logits of the reloaded checkpoint must match the masked model this closely (norm-relative).
FLOAT32_TOLERANCE = 1e-4
LOW_PRECISION_TOLERANCE = 2e-2
PROBE_TOKENS = 16


def export_checkpoint(model: nn.Module, tokenizer, masks: ModelMasks, spec: ArchSpec, report: dict,
                      out_dir: Path, overwrite: bool = False) -> Path:
    """Merge, slice and save `model` to `out_dir`; consumes the model (it is merged in place)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LoraPruneError(f"{out_dir} exists; pass --overwrite or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        model.eval()
        shape = LayerShape.from_config(unwrap(model).config)
        dtype = unwrap(model).dtype
        probe = _probe_ids(unwrap(model))
        masks.attach(model, spec)
        reference = _logits(model, probe)
        masks.detach()
        merged = merge_lora(model)
        params_before = merged.num_parameters()
        source_architecture = type(merged).__name__
        sliced = slice_model(merged, masks, spec)
        drop_quantizer(sliced)
        sliced.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        summary = _export_summary(sliced, masks, shape, source_architecture, params_before)
        full_report = {**report, "export": summary}
        (tmp / REPORT_NAME).write_text(json.dumps(full_report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(full_report))
        validate_checkpoint(tmp, summary, probe, reference, dtype)
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def validate_checkpoint(folder: Path, summary: dict, probe: torch.Tensor,
                        reference: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> None:
    """Reload `folder` with plain transformers and check widths, size and logits."""
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
    logits = _logits(reloaded, probe)
    if not torch.isfinite(logits).all():
        raise LoraPruneError("the exported model produces non-finite logits; check the run's "
                             "loss curve, or export in float32")
    if reference is not None:
        difference = relative_difference(logits, reference)
        tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else LOW_PRECISION_TOLERANCE
        if difference > tolerance:
            raise LoraPruneError(f"exported logits differ from the masked model's by {difference:.2e}"
                                 f" (limit {tolerance:.0e}); please report this")


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm of the difference over the norm of `expected`, in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


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


def _probe_ids(model: PreTrainedModel) -> torch.Tensor:
    """A short fixed token sequence to compare logits on."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, PROBE_TOKENS), generator=generator)


@torch.inference_mode()
def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of `input_ids` on the model's device, returned on the CPU."""
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the validated folder to `out_dir`, replacing an old one only after that worked."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, trash / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(trash / out_dir.name, out_dir)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
