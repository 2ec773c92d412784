"""The training losses the recipe can optimise; each takes the model and a batch, returns a scalar.

A loss that distils says so (``needs_teacher``) and also receives the teacher's logits; the recipe
never asks which loss it runs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from loraprune.config import PruneConfig

IGNORE = -100  # target of a position that predicts nothing (the last of a block)
CHUNK_POSITIONS = 32  # rows of (positions, vocabulary) logits handled at once


class TrainingLoss(Protocol):
    """A loss of one batch of token blocks, shape (batch, seq_len)."""

    needs_teacher: bool

    def __call__(self, model: nn.Module, batch: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor: ...


class NextTokenCrossEntropy:
    """Language-modelling loss: mean cross-entropy of every next token of the blocks (or of the labelled ones)."""

    needs_teacher = False

    def __call__(self, model: nn.Module, batch: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        return model(input_ids=batch, labels=batch if labels is None else labels, use_cache=False).loss


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ²·KL(teacher ‖ student) of the softened next-token distributions, mean over positions."""
    vocabulary = student_logits.shape[-1]
    return _FusedDistillation.apply(student_logits.reshape(-1, vocabulary), teacher_logits.reshape(-1, vocabulary),
                                    None, 1.0, temperature)


def next_token_targets(batch: torch.Tensor) -> torch.Tensor:
    """The token each position predicts, flattened; IGNORE at each block's last position (and unlabelled ones)."""
    targets = torch.full_like(batch, IGNORE)
    targets[:, :-1] = batch[:, 1:]
    return targets.reshape(-1)


class _FusedDistillation(torch.autograd.Function):
    """(1 − w)·cross-entropy + w·τ²·KL(teacher ‖ student) over (positions, vocabulary) logits, in chunks.

    Nothing of vocabulary size is kept between forward and backward but the two logit tensors that
    exist anyway: both passes recompute the softmaxes chunk by chunk, so distillation adds about one
    (positions × vocabulary) tensor to training memory instead of half a dozen.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None,
                weight: float, temperature: float) -> torch.Tensor:
        positions = student.shape[0]
        predicted = max(1, int((targets != IGNORE).sum())) if targets is not None else 1
        accumulator = torch.promote_types(student.dtype, torch.float32)
        cross_entropy, kl = student.new_zeros((), dtype=accumulator), student.new_zeros((), dtype=accumulator)
        for rows in torch.arange(positions, device=student.device).split(CHUNK_POSITIONS):
            s, t = _at_least_float32(student[rows]), _at_least_float32(teacher[rows])
            log_q_student = torch.log_softmax(s / temperature if temperature != 1 else s, dim=-1)
            log_q_teacher = torch.log_softmax(t / temperature if temperature != 1 else t, dim=-1)
            kl += (log_q_teacher.exp() * (log_q_teacher - log_q_student)).sum()
            if targets is not None and weight < 1:
                log_p = log_q_student if temperature == 1 else torch.log_softmax(s, dim=-1)
                chunk_targets = targets[rows]
                kept = chunk_targets != IGNORE
                cross_entropy -= log_p.gather(1, chunk_targets.clamp_min(0)[:, None])[kept].sum()
        ctx.save_for_backward(student, teacher, targets)
        ctx.settings = (weight, temperature, predicted)
        cross_entropy_term = (1 - weight) * cross_entropy / predicted if targets is not None else 0.0
        return cross_entropy_term + weight * temperature ** 2 * kl / positions

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student, teacher, targets = ctx.saved_tensors
        weight, temperature, predicted = ctx.settings
        positions = student.shape[0]
        grad = torch.empty_like(student)
        for rows in torch.arange(positions, device=student.device).split(CHUNK_POSITIONS):
            s, t = _at_least_float32(student[rows]), _at_least_float32(teacher[rows])
            q_student = torch.softmax(s / temperature if temperature != 1 else s, dim=-1)
            q_teacher = torch.softmax(t / temperature if temperature != 1 else t, dim=-1)
            # d(τ²·KL)/ds = τ·(softmax(s/τ) − softmax(t/τ)), per position.
            chunk = (weight * temperature / positions) * (q_student - q_teacher)
            if targets is not None and weight < 1:
                # d(cross-entropy)/ds = softmax(s) − one-hot(target), on predicting positions.
                p_student = q_student if temperature == 1 else torch.softmax(s, dim=-1)
                chunk_targets = targets[rows]
                kept = (chunk_targets != IGNORE)[:, None]
                p_student = p_student.scatter_add(1, chunk_targets.clamp_min(0)[:, None],
                                                  -torch.ones_like(p_student[:, :1]))
                chunk += ((1 - weight) / predicted) * p_student * kept
            grad[rows] = (grad_output * chunk).to(grad.dtype)
        return grad, None, None, None, None


def _at_least_float32(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.promote_types(values.dtype, torch.float32))


class SelfDistillation:
    """(1 − w)·cross-entropy + w·τ²·KL(teacher ‖ student); the teacher is the unpruned base model."""

    needs_teacher = True

    def __init__(self, weight: float, temperature: float):
        self.weight, self.temperature = weight, temperature

    def __call__(self, model: nn.Module, batch: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if teacher_logits is None:
            raise RuntimeError("self-distillation needs the teacher's logits of the batch")
        logits = model(input_ids=batch, use_cache=False).logits
        vocabulary = logits.shape[-1]
        return _FusedDistillation.apply(logits.reshape(-1, vocabulary), teacher_logits.reshape(-1, vocabulary),
                                        next_token_targets(batch if labels is None else labels), self.weight,
                                        self.temperature)


def build_loss(config: PruneConfig) -> TrainingLoss:
    """The loss a run trains with: self-distillation when ``config.distill`` > 0, else cross-entropy."""
    if config.distill > 0:
        return SelfDistillation(config.distill, config.distill_temperature)
    return NextTokenCrossEntropy()
