"""Weight magnitude: the squared (or absolute) entries of W + s·B·A, no gradients at all."""

from __future__ import annotations

import torch
from torch import nn

from loraprune.pruning.scorers.base import register_scorer
from loraprune.pruning.scorers.elements import ElementScorer
from loraprune.pruning.scorers.weights import ALL_ROWS, effective_weight, power


def magnitude_element_scores(module: nn.Module, score_power: str = "square", rows: slice = ALL_ROWS) -> torch.Tensor:
    """Float32 element scores |W + s·B·A|² of ``rows`` (group sums are squared L2 norms)."""
    with torch.no_grad():
        return power(effective_weight(module, rows), score_power)


@register_scorer("magnitude")
class MagnitudeScorer(ElementScorer):
    """Baseline: the smallest weights go first."""

    needs_backward = False

    def element_scores(self, projection: nn.Module, rows: slice = ALL_ROWS) -> torch.Tensor:
        return magnitude_element_scores(projection, self.config.score_power, rows)
