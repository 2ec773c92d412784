"""Wrap a model with the LoRA adapters that are fine-tuned while it is pruned (PEFT does the work)."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from loraprune.config import PruneConfig
from loraprune.errors import LoraPruneError
from loraprune.models import ArchSpec
from loraprune.pruning.scorers import scorer_class


def wrap_with_lora(model: PreTrainedModel, config: PruneConfig, spec: ArchSpec) -> nn.Module:
    """Add LoRA adapters; when the criterion needs ∇W, let the frozen projections get gradients too."""
    check_base_precision(config)
    lora = LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    # LoRA weights (and so their AdamW state) stay float32 under a bfloat16 or float16 base.
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    if scorer_class(config.criterion).needs_weight_gradients:
        enable_weight_gradients(peft_model, spec)
    return peft_model


def check_base_precision(config: PruneConfig) -> None:
    """A quantised base has no ∇W: refuse a criterion that needs it."""
    if config.base_bits is not None and scorer_class(config.criterion).needs_weight_gradients:
        article = "an" if config.base_bits == 8 else "a"
        raise LoraPruneError(f"--criterion {config.criterion} needs gradients of the frozen weights, which "
                             f"{article} {config.base_bits}-bit base cannot have; drop --base-bits or use --criterion "
                             "lora or fisher")


def enable_weight_gradients(model: nn.Module, spec: ArchSpec) -> None:
    """Give every prunable projection's frozen weight a gradient (and pay its memory, for real)."""
    prunable = set(spec.projection_names)
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        # "….q_proj.base_layer.weight" under PEFT, "….q_proj.weight" on a plain model.
        owner = parts[-3] if len(parts) >= 3 and parts[-2] == "base_layer" else parts[-2]
        if parts[-1] == "weight" and "lora_" not in name and owner in prunable:
            parameter.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters the optimizer updates (never the frozen weights, even when they get ∇W)."""
    return [parameter for name, parameter in model.named_parameters() if "lora_" in name]


def clear_weight_gradients(model: nn.Module) -> None:
    """Free ∇W of frozen weights once a step has been scored (the optimizer never zeroes them)."""
    for name, parameter in model.named_parameters():
        if "lora_" not in name and parameter.grad is not None:
            parameter.grad = None
