"""The decoding default a pruned model ships with: the mildest repetition penalty that stops its loops.

Pruning leaves a model whose greedy text loops ("the matter of the matter of …") while its perplexity
still looks fair; a repetition penalty (CTRL's: a seen token's logit is divided by it when positive,
multiplied when negative) breaks the loops, and too strong a one garbles the text. So candidates are
tried mildest first on prompts cut from the run's validation text, against the dense model's own text.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.evaluation.fidelity import DenseView
from loraprune.evaluation.generation import greedy_ids, repeated_ngram_fraction

CANDIDATES = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
TOLERANCE = 0.05  # issue 16's bar: repetition within 0.05 of the dense model's
TUNING_PROMPTS = 12
PROMPT_TOKENS = 16


@dataclass
class DecodingChoice:
    """The repetition penalty chosen (1: none) and what each candidate scored on the tuning prompts."""

    repetition_penalty: float
    measured: bool  # False: given by --repetition-penalty
    reached_bar: bool  # the chosen penalty's repetition is within TOLERANCE of dense (else: the strongest tried)
    dense_repetition: float | None  # the dense model's score on the tuning prompts, decoded as its config says
    tried: dict[str, float]  # penalty -> the pruned model's repetition on the tuning prompts
    n_prompts: int
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        return asdict(self)


def tuning_prompts(validation_ids: torch.Tensor, count: int = TUNING_PROMPTS,
                   length: int = PROMPT_TOKENS) -> list[list[int]]:
    """Up to ``count`` non-overlapping prompts of ``length`` token ids, spread evenly over a 1-D tensor of ids."""
    if validation_ids.numel() < length:
        raise LoraPruneError(f"the validation text has {validation_ids.numel()} tokens, fewer than one "
                             f"{length}-token prompt to choose --repetition-penalty on; pass --repetition-penalty off")
    stride = max(length, (validation_ids.numel() - length) // max(1, count - 1))
    starts = range(0, validation_ids.numel() - length + 1, stride)
    return [validation_ids[start:start + length].tolist() for start in list(starts)[:count]]


def repetition_on(model: nn.Module, tokenizer, prompts: list[list[int]],
                  repetition_penalty: float | None = None) -> float:
    """Mean share of repeated 4-grams in the greedy continuations of ``prompts`` (token ids)."""
    continuations = greedy_ids(model, tokenizer, prompts, repetition_penalty=repetition_penalty)
    return sum(repeated_ngram_fraction(ids) for ids in continuations) / len(continuations)


def choose_repetition_penalty(model: nn.Module, tokenizer, prompts: list[list[int]], dense: DenseView,
                              candidates: tuple[float, ...] = CANDIDATES) -> DecodingChoice:
    """The mildest candidate under which ``model`` repeats itself at most TOLERANCE more than its dense base
    (``dense()``: a context under which ``model`` is that base) does; the strongest if none does."""
    started = time.perf_counter()
    with dense():
        dense_repetition = repetition_on(model, tokenizer, prompts)
    tried = {}
    for penalty in candidates:
        tried[str(penalty)] = repetition_on(model, tokenizer, prompts, penalty)
        if tried[str(penalty)] <= dense_repetition + TOLERANCE:
            break
    reached = tried[str(penalty)] <= dense_repetition + TOLERANCE
    return DecodingChoice(penalty, True, reached, dense_repetition, tried, len(prompts), time.perf_counter() - started)


def given_repetition_penalty(penalty: float) -> DecodingChoice:
    """A penalty the user set: nothing is measured."""
    return DecodingChoice(penalty, False, True, None, {}, 0, 0.0)
