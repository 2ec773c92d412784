"""Read the frozen weight and the LoRA factors out of a PEFT LoRA layer (or a plain Linear).

In a sharded (FSDP2) run weights and gradients are shards; scorers read them through ``whole``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from loraprune.models.quantised import dequantised_rows, is_quantised

ALL_ROWS = slice(None)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (every process must ask for the same ones); others pass through."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight W, shape (out, in)."""
    return getattr(module, "base_layer", module).weight


def frozen_weight_rows(module: nn.Module, rows: slice = ALL_ROWS) -> torch.Tensor:
    """Rows of the frozen weight W in float32, shape (rows, in); a quantised W is dequantised row by row."""
    if is_quantised(module):
        return dequantised_rows(getattr(module, "base_layer", module), rows)
    return whole(base_weight(module).detach())[rows].float()


def out_features(module: nn.Module) -> int:
    """Rows of the frozen weight W."""
    return base_weight(module).shape[0]


def lora_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A (r, in), B (out, r), scaling s) of the active adapter, or None if not adapted."""
    lora_a = getattr(module, "lora_A", None)
    if not lora_a:
        return None
    name = module.active_adapters[0]
    return lora_a[name].weight, module.lora_B[name].weight, module.scaling[name]


def effective_weight(module: nn.Module, rows: slice = ALL_ROWS) -> torch.Tensor:
    """Rows of W + s·B·A in float32: the weight the layer applies (and what the export merges to)."""
    weight = frozen_weight_rows(module, rows)
    factors = lora_factors(module)
    if factors is None:
        return weight
    a, b, scaling = factors
    return weight + scaling * (whole(b.detach())[rows].float() @ whole(a.detach()).float())


def power(values: torch.Tensor, kind: str) -> torch.Tensor:
    """Square (paper) or absolute value (reference code) of an element-wise product."""
    return values.square() if kind == "square" else values.abs()
