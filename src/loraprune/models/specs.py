"""Declarative specs of the architecture families loraprune can prune.

A spec says where the decoder layers live and which projections form an attention unit and an
FFN channel; everything else (head counts, widths) is read from the model's config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loraprune.errors import LoraPruneError


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable projections of one architecture family live."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"

    @property
    def projection_names(self) -> tuple[str, ...]:
        """Short names of the seven projections LoRA adapts by default."""
        return (self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                self.gate_proj, self.up_proj, self.down_proj)


LLAMA = ArchSpec(family="llama", model_types=("llama",))
MISTRAL = ArchSpec(family="mistral", model_types=("mistral",))
QWEN2 = ArchSpec(family="qwen2", model_types=("qwen2",))

SPECS: tuple[ArchSpec, ...] = (LLAMA, MISTRAL, QWEN2)


def supported_model_types() -> list[str]:
    """Every config.model_type loraprune knows how to prune."""
    return sorted(t for spec in SPECS for t in spec.model_types)


def spec_for(config) -> ArchSpec:
    """The spec for a model config, or a LoraPruneError listing the supported types."""
    model_type = getattr(config, "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    raise LoraPruneError(
        f"architecture '{model_type}' is not supported; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under any PEFT wrapper."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The model's list of decoder layers, looked up through any PEFT wrapper."""
    return unwrap(model).get_submodule(spec.layers_path)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the transformers model, tied embeddings counted once, adapters excluded."""
    return sum(logical_numel(p) for name, p in unwrap(model).named_parameters() if "lora_" not in name)


def logical_numel(parameter: torch.Tensor) -> int:
    """Weights a parameter stands for: a 4-bit quantised weight packs two per byte."""
    state = getattr(parameter, "quant_state", None)
    return math.prod(state.shape) if state is not None else parameter.numel()


def projection_biases(model: nn.Module, spec: ArchSpec) -> tuple[bool, bool]:
    """(attention projections have biases, MLP projections have biases), as pruned units count them."""
    attention = getattr(decoder_layers(model, spec)[0], spec.attention)
    attention_bias = getattr(attention, spec.q_proj).bias is not None
    return attention_bias, bool(getattr(unwrap(model).config, "mlp_bias", False))
