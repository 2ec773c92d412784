"""LoRAPrune's criterion: importance of frozen weights from LoRA factors and their gradients only.

Paper Eq. 10-11: G = ∇B·A + B·∇A − ∇B·∇A estimates ∇W, and (G ⊙ (W + s·B·A))² scores each weight.
∇W is never computed: W keeps requires_grad=False.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.criteria.lora_weights import effective_weight, lora_factors, power
from loraprune.errors import LoraPruneError


def estimated_weight_gradient(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor,
                              grad_b: torch.Tensor) -> torch.Tensor:
    """G = ∇B·A + B·∇A − ∇B·∇A, shape (out, in)."""
    # Factored as ∇B·(A − ∇A) + B·∇A: the same G with two rank-r products instead of three.
    return grad_b @ (a - grad_a) + b @ grad_a


def lora_element_scores(module: nn.Module, score_power: str = "square") -> torch.Tensor:
    """Element scores (G ⊙ (W + s·B·A))² of one LoRA-adapted projection."""
    factors = lora_factors(module)
    if factors is None:
        raise LoraPruneError("the lora criterion needs LoRA on every prunable projection; keep "
                             "q,k,v,o,gate,up,down in --lora-targets or choose another --criterion")
    a, b, _ = factors
    if a.grad is None or b.grad is None:
        return torch.zeros_like(effective_weight(module))
    with torch.no_grad():
        g = estimated_weight_gradient(a.detach(), b.detach(), a.grad, b.grad)
        return power(g * effective_weight(module).to(g.dtype), score_power).float()
