"""The training losses the recipe can optimise; each takes the model and a batch, returns a scalar.

A loss that distils says so (``needs_teacher``) and also receives the teacher's logits; the recipe
never asks which loss it runs. A loss whose gradient says nothing about which unit matters (pure
distillation: the unpruned student is its own teacher, a zero loss with zero gradient) also hands
the recipe a separate *scoring loss* for the mask-gradient criterion (``with_scoring_loss``).
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

    def with_scoring_loss(self, model: nn.Module, batch: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                          labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(training loss, the loss a gradient criterion should score instead, or None: score the training loss)."""
        ...


class NextTokenCrossEntropy:
    """Language-modelling loss: mean cross-entropy of every next token of the blocks (or of the labelled ones)."""

    needs_teacher = False

    def __call__(self, model: nn.Module, batch: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        return model(input_ids=batch, labels=batch if labels is None else labels, use_cache=False).loss

    def with_scoring_loss(self, model: nn.Module, batch: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                          labels: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return self(model, batch, teacher_logits, labels), None


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    top_k: int | None = None) -> torch.Tensor:
    """τ²·KL(teacher ‖ student) of the softened next-token distributions, mean over positions.

    With ``top_k`` both distributions are restricted to the teacher's k likeliest tokens and renormalised.
    """
    vocabulary = student_logits.shape[-1]
    return _FusedDistillation.apply(student_logits.reshape(-1, vocabulary), teacher_logits.reshape(-1, vocabulary),
                                    None, 1.0, temperature, top_k)


@torch.no_grad()
def sample_teacher_tokens(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per position drawn from softmax(teacher / τ), flattened; chunked like the losses."""
    vocabulary = teacher_logits.shape[-1]
    flat = teacher_logits.reshape(-1, vocabulary)
    tokens = [torch.multinomial(torch.softmax(_at_least_float32(chunk) / temperature, dim=-1), 1).squeeze(1)
              for chunk in flat.split(CHUNK_POSITIONS)]
    return torch.cat(tokens)


def teacher_sampled_cross_entropy(student_logits: torch.Tensor, sampled: torch.Tensor,
                                  temperature: float) -> torch.Tensor:
    """τ·cross-entropy of softmax(student / τ) on tokens drawn from the teacher at τ, mean over positions.

    Its squared per-sequence gradients estimate the Fisher of softmax(·/τ), which is the Hessian of
    τ²·KL(teacher ‖ student) where student = teacher: the curvature a removed unit's output change
    meets under pure distillation (Kwon et al. 2022's mask Fisher, taken on the teacher's labels).
    """
    vocabulary = student_logits.shape[-1]
    scaled = student_logits.reshape(-1, vocabulary)
    if temperature != 1:
        scaled = scaled / temperature
    # Weight 0: the fused function's cross-entropy alone, chunked, with no vocabulary-sized state.
    return temperature * _FusedDistillation.apply(scaled, scaled.detach(), sampled, 0.0, 1.0, None)


def next_token_targets(batch: torch.Tensor) -> torch.Tensor:
    """The token each position predicts, flattened; IGNORE at each block's last position (and unlabelled ones)."""
    targets = torch.full_like(batch, IGNORE)
    targets[:, :-1] = batch[:, 1:]
    return targets.reshape(-1)


class _FusedDistillation(torch.autograd.Function):
    """(1 − w)·cross-entropy + w·τ²·KL(teacher ‖ student) over (positions, vocabulary) logits, in chunks.

    With ``top_k`` the KL compares the two distributions over the teacher's k likeliest tokens of each
    position, both renormalised over them (the cross-entropy stays over the whole vocabulary).

    Nothing of vocabulary size is kept between forward and backward but the two logit tensors that
    exist anyway: both passes recompute the softmaxes chunk by chunk, so distillation adds about one
    (positions × vocabulary) tensor to training memory instead of half a dozen.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None,
                weight: float, temperature: float, top_k: int | None = None) -> torch.Tensor:
        positions = student.shape[0]
        predicted = max(1, int((targets != IGNORE).sum())) if targets is not None else 1
        accumulator = torch.promote_types(student.dtype, torch.float32)
        cross_entropy, kl = student.new_zeros((), dtype=accumulator), student.new_zeros((), dtype=accumulator)
        for rows in torch.arange(positions, device=student.device).split(CHUNK_POSITIONS):
            s, t = _at_least_float32(student[rows]), _at_least_float32(teacher[rows])
            if weight > 0:
                s_kl, t_kl = _top_k_of_teacher(s, t, top_k)
                log_q_student = torch.log_softmax(s_kl / temperature if temperature != 1 else s_kl, dim=-1)
                log_q_teacher = torch.log_softmax(t_kl / temperature if temperature != 1 else t_kl, dim=-1)
                kl += (log_q_teacher.exp() * (log_q_teacher - log_q_student)).sum()
            if targets is not None and weight < 1:
                log_p = torch.log_softmax(s, dim=-1)
                chunk_targets = targets[rows]
                kept = chunk_targets != IGNORE
                cross_entropy -= log_p.gather(1, chunk_targets.clamp_min(0)[:, None])[kept].sum()
        ctx.save_for_backward(student, teacher, targets)
        ctx.settings = (weight, temperature, predicted, top_k)
        cross_entropy_term = (1 - weight) * cross_entropy / predicted if targets is not None else 0.0
        return cross_entropy_term + weight * temperature ** 2 * kl / positions

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student, teacher, targets = ctx.saved_tensors
        weight, temperature, predicted, top_k = ctx.settings
        positions = student.shape[0]
        grad = torch.empty_like(student)
        for rows in torch.arange(positions, device=student.device).split(CHUNK_POSITIONS):
            s, t = _at_least_float32(student[rows]), _at_least_float32(teacher[rows])
            chunk = torch.zeros_like(s)
            if weight > 0:
                s_kl, t_kl = _top_k_of_teacher(s, t, top_k)
                q_student = torch.softmax(s_kl / temperature if temperature != 1 else s_kl, dim=-1)
                q_teacher = torch.softmax(t_kl / temperature if temperature != 1 else t_kl, dim=-1)
                # d(τ²·KL)/ds = τ·(softmax(s/τ) − softmax(t/τ)), per position (on the top k only).
                kl_grad = (weight * temperature / positions) * (q_student - q_teacher)
                if top_k is None:
                    chunk += kl_grad
                else:
                    chunk.scatter_(1, t.topk(top_k, dim=-1).indices, kl_grad)
            if targets is not None and weight < 1:
                # d(cross-entropy)/ds = softmax(s) − one-hot(target), on predicting positions.
                p_student = torch.softmax(s, dim=-1)
                chunk_targets = targets[rows]
                kept = (chunk_targets != IGNORE)[:, None]
                p_student = p_student.scatter_add(1, chunk_targets.clamp_min(0)[:, None],
                                                  -torch.ones_like(p_student[:, :1]))
                chunk += ((1 - weight) / predicted) * p_student * kept
            grad[rows] = (grad_output * chunk).to(grad.dtype)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _at_least_float32(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.promote_types(values.dtype, torch.float32))


def _top_k_of_teacher(student: torch.Tensor, teacher: torch.Tensor,
                      top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (rows, vocabulary) logits at the teacher's k likeliest tokens of each row; all of them without k."""
    if top_k is None:
        return student, teacher
    index = teacher.topk(top_k, dim=-1).indices  # (rows, k)
    return student.gather(1, index), teacher.gather(1, index)


class SelfDistillation:
    """(1 − w)·cross-entropy + w·τ²·KL(teacher ‖ student); the teacher is the unpruned base model.

    Pure distillation (w = 1) is scored on cross-entropy against tokens sampled from the teacher
    (``teacher_sampled_cross_entropy``) while it trains on the exact KL; with a cross-entropy part
    the training loss has a first-order signal of its own and is scored as it is.
    """

    needs_teacher = True

    def __init__(self, weight: float, temperature: float, top_k: int | None = None):
        self.weight, self.temperature, self.top_k = weight, temperature, top_k

    def __call__(self, model: nn.Module, batch: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.with_scoring_loss(model, batch, teacher_logits, labels, scoring=False)[0]

    def with_scoring_loss(self, model: nn.Module, batch: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                          labels: torch.Tensor | None = None,
                          scoring: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if teacher_logits is None:
            raise RuntimeError("self-distillation needs the teacher's logits of the batch")
        logits = model(input_ids=batch, use_cache=False).logits
        vocabulary = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocabulary)
        loss = _FusedDistillation.apply(flat_logits, teacher_logits.reshape(-1, vocabulary),
                                        next_token_targets(batch if labels is None else labels), self.weight,
                                        self.temperature, self.top_k)
        if not scoring or self.weight < 1:
            return loss, None
        sampled = sample_teacher_tokens(teacher_logits, self.temperature)
        return loss, teacher_sampled_cross_entropy(flat_logits, sampled, self.temperature)


def build_loss(config: PruneConfig) -> TrainingLoss:
    """The loss a run trains with: self-distillation when ``config.distill`` > 0, else cross-entropy."""
    if config.distill > 0:
        return SelfDistillation(config.distill, config.distill_temperature, config.distill_top_k)
    return NextTokenCrossEntropy()
