"""The vanilla first-order Taylor criterion (∇W ⊙ W)², as LLM-Pruner uses it.

It needs real gradients of the frozen weights, and so their memory: that cost is the point of
comparison with the ``lora`` criterion.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.criteria.lora_weights import base_weight, effective_weight, power


def gradient_element_scores(module: nn.Module, score_power: str = "square") -> torch.Tensor:
    """Element scores (∇W ⊙ (W + s·B·A))² from the true gradient of the frozen weight."""
    grad = base_weight(module).grad
    if grad is None:
        return torch.zeros_like(base_weight(module), dtype=torch.float32)
    with torch.no_grad():
        # ∂L/∂W equals ∂L/∂(W + s·B·A): the LoRA update is added to W.
        return power(grad * effective_weight(module), score_power).float()
