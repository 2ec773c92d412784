"""Weight magnitude: the squared (or absolute) entries of W + s·B·A, no gradients at all."""

from __future__ import annotations

import torch
from torch import nn

from loraprune.criteria.lora_weights import effective_weight, power


def magnitude_element_scores(module: nn.Module, score_power: str = "square") -> torch.Tensor:
    """Element scores |W + s·B·A|² (group sums are squared L2 norms)."""
    with torch.no_grad():
        return power(effective_weight(module), score_power).float()
