"""Importance criteria: each turns one projection's weights (+ LoRA, + gradients) into scores.

``lora`` is LoRAPrune's; ``grad`` (LLM-Pruner's vanilla Taylor), ``magnitude`` and ``random`` are
the baselines it is compared against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from loraprune.criteria.gradient import gradient_element_scores
from loraprune.criteria.lora_guided import lora_element_scores
from loraprune.criteria.magnitude import magnitude_element_scores
from loraprune.criteria.random import random_group_scores

ElementScorer = Callable[[nn.Module, str], torch.Tensor]

ELEMENT_SCORERS: dict[str, ElementScorer] = {
    "lora": lora_element_scores,
    "grad": gradient_element_scores,
    "magnitude": magnitude_element_scores,
}

__all__ = ["ELEMENT_SCORERS", "needs_weight_gradients", "random_group_scores"]


def needs_weight_gradients(criterion: str) -> bool:
    """Only the vanilla criterion needs ∇W of the frozen weights."""
    return criterion == "grad"
