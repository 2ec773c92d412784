"""The vanilla first-order Taylor criterion (∇W ⊙ W)², as LLM-Pruner uses it.

It needs real gradients of the frozen weights, and so their memory: that cost is the point of
comparison with the ``lora`` criterion.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.pruning.scorers.base import register_scorer
from loraprune.pruning.scorers.elements import ElementScorer
from loraprune.pruning.scorers.weights import ALL_ROWS, base_weight, effective_weight, power, whole


def gradient_element_scores(module: nn.Module, score_power: str = "square", rows: slice = ALL_ROWS) -> torch.Tensor:
    """Float32 element scores (∇W ⊙ (W + s·B·A))² of ``rows``, from the true gradient of the frozen weight."""
    grad = base_weight(module).grad
    if grad is None:
        raise RuntimeError("the grad criterion found no gradient on a frozen weight: it needs "
                           "requires_grad on every prunable projection and a backward pass first")
    with torch.no_grad():
        # ∂L/∂W equals ∂L/∂(W + s·B·A): the LoRA update is added to W. Cast before multiplying:
        # in float16 a product like 3e-5 · 0.02 squares to 0 and every score would tie.
        return power(whole(grad)[rows].float() * effective_weight(module, rows), score_power)


@register_scorer("grad")
class GradientScorer(ElementScorer):
    """LLM-Pruner's vanilla element-wise Taylor score; allocates ∇W of every prunable projection."""

    needs_weight_gradients = True

    def element_scores(self, projection: nn.Module, rows: slice = ALL_ROWS) -> torch.Tensor:
        return gradient_element_scores(projection, self.config.score_power, rows)
