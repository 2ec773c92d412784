"""The training losses the recipe can optimise; each takes the model and a batch, returns a scalar.

A loss that distils says so (``needs_teacher``) and also receives the teacher's logits; the recipe
never asks which loss it runs.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loraprune.config import PruneConfig


class TrainingLoss(Protocol):
    """A loss of one batch of token blocks, shape (batch, seq_len)."""

    needs_teacher: bool

    def __call__(self, model: nn.Module, batch: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> torch.Tensor: ...


class NextTokenCrossEntropy:
    """Language-modelling loss: mean cross-entropy of every next token of the blocks."""

    needs_teacher = False

    def __call__(self, model: nn.Module, batch: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        return model(input_ids=batch, labels=batch, use_cache=False).loss


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ²·KL(teacher ‖ student) of the softened next-token distributions, mean over positions."""
    vocabulary = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().view(-1, vocabulary) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().view(-1, vocabulary) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature ** 2  # keeps gradient size independent of τ (Hinton et al. 2015)


class SelfDistillation:
    """(1 − w)·cross-entropy + w·τ²·KL(teacher ‖ student); the teacher is the unpruned base model."""

    needs_teacher = True

    def __init__(self, weight: float, temperature: float):
        self.weight, self.temperature = weight, temperature

    def __call__(self, model: nn.Module, batch: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        if teacher_logits is None:
            raise RuntimeError("self-distillation needs the teacher's logits of the batch")
        with_labels = self.weight < 1.0  # pure distillation skips the cross-entropy entirely
        output = model(input_ids=batch, labels=batch if with_labels else None, use_cache=False)
        kl = distillation_kl(output.logits, teacher_logits, self.temperature)
        return (1 - self.weight) * output.loss + self.weight * kl if with_labels else kl


def build_loss(config: PruneConfig) -> TrainingLoss:
    """The loss a run trains with: self-distillation when ``config.distill`` > 0, else cross-entropy."""
    if config.distill > 0:
        return SelfDistillation(config.distill, config.distill_temperature)
    return NextTokenCrossEntropy()
