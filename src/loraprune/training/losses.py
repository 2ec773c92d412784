"""The training losses the recipe can optimise; each takes the model and a batch, returns a scalar.

The recipe calls whichever ``build_loss`` gives it and never asks which one it is.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from loraprune.config import PruneConfig


class TrainingLoss(Protocol):
    """A loss of one batch of token blocks, shape (batch, seq_len)."""

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor: ...


class NextTokenCrossEntropy:
    """Language-modelling loss: mean cross-entropy of every next token of the blocks."""

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch, labels=batch, use_cache=False).loss


def build_loss(config: PruneConfig) -> TrainingLoss:
    """The loss a run trains with (today next-token cross-entropy for every config)."""
    return NextTokenCrossEntropy()
