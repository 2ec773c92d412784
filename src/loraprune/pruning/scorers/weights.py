"""Read the frozen weight and the LoRA factors out of a PEFT LoRA layer (or a plain Linear).

In a sharded (FSDP2) run weights and gradients are shards; scorers read them through ``whole``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (every process must ask for the same ones); others pass through."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight W, shape (out, in)."""
    return getattr(module, "base_layer", module).weight


def lora_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A (r, in), B (out, r), scaling s) of the active adapter, or None if not adapted."""
    lora_a = getattr(module, "lora_A", None)
    if not lora_a:
        return None
    name = module.active_adapters[0]
    return lora_a[name].weight, module.lora_B[name].weight, module.scaling[name]


def effective_weight(module: nn.Module) -> torch.Tensor:
    """W + s·B·A in float32: the weight the layer applies (and what the export merges to)."""
    weight = whole(base_weight(module).detach()).float()
    factors = lora_factors(module)
    if factors is None:
        return weight
    a, b, scaling = factors
    return weight + scaling * (whole(b.detach()).float() @ whole(a.detach()).float())


def power(values: torch.Tensor, kind: str) -> torch.Tensor:
    """Square (paper) or absolute value (reference code) of an element-wise product."""
    return values.square() if kind == "square" else values.abs()
