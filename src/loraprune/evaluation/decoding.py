"""The decoding default a pruned model ships with: the mildest repetition penalty that stops it looping.

Pruning leaves a model whose greedy continuations fall into loops ("the matter of the matter of …")
while its perplexity still looks fair, and recovery training on one text does not cure it. A
repetition penalty (CTRL's: the logit of a token already in the text is divided by the penalty when
positive, multiplied when negative) breaks the loops; too strong a one garbles the text. So the run
tries penalties, mildest first, on prompts cut from its own validation text, and keeps the first
whose continuations repeat themselves no more than the dense model's plain greedy ones do (plus a
tolerance). The fixed health prompts (prose, code, facts, chat) then judge the choice on text it
was not chosen on. Exports write it where runtimes read their defaults: generation_config.json
(transformers, vLLM) and ``general.sampling.penalty_repeat`` (llama.cpp).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from loraprune.evaluation.generation import greedy_batch, repeated_ngram_fraction

CANDIDATES = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
TOLERANCE = 0.05  # issue 16's bar: repetition within 0.05 of the dense model's
TUNING_PROMPTS = 12
PROMPT_TOKENS = 16


@dataclass
class DecodingChoice:
    """The repetition penalty chosen (1: none) and what each candidate scored on the tuning prompts."""

    repetition_penalty: float
    how: str  # "measured" or "given" (--repetition-penalty)
    dense_repetition: float | None  # the dense model's plain greedy score on the tuning prompts
    tried: dict[str, float]  # penalty -> the pruned model's repetition on the tuning prompts
    n_prompts: int
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        return asdict(self)


def tuning_prompts(tokenizer, validation_ids: torch.Tensor, count: int = TUNING_PROMPTS,
                   length: int = PROMPT_TOKENS) -> list[str]:
    """``count`` prompts of ``length`` tokens spread evenly over a 1-D tensor of validation token ids."""
    stride = max(1, (validation_ids.numel() - length) // count)
    starts = range(0, max(1, validation_ids.numel() - length + 1), stride)
    return [tokenizer.decode(validation_ids[start:start + length]) for start in list(starts)[:count]]


def repetition_on(model: nn.Module, tokenizer, prompts: list[str], repetition_penalty: float = 1.0) -> float:
    """Mean share of repeated 4-grams in the greedy continuations of ``prompts``."""
    continuations = greedy_batch(model, tokenizer, prompts, repetition_penalty=repetition_penalty)
    return sum(repeated_ngram_fraction(ids) for ids in continuations) / len(continuations)


def choose_repetition_penalty(model: nn.Module, tokenizer, prompts: list[str],
                              dense: Callable[[], AbstractContextManager],
                              candidates: tuple[float, ...] = CANDIDATES) -> DecodingChoice:
    """The mildest candidate under which ``model`` repeats itself at most TOLERANCE more than its dense
    base does without one (``dense()``: a context under which ``model`` is that base); the strongest
    candidate if none does."""
    started = time.perf_counter()
    with dense():
        bar = repetition_on(model, tokenizer, prompts) + TOLERANCE
    tried = {}
    for penalty in candidates:
        tried[str(penalty)] = repetition_on(model, tokenizer, prompts, penalty)
        if tried[str(penalty)] <= bar:
            break
    return DecodingChoice(penalty, "measured", bar - TOLERANCE, tried, len(prompts), time.perf_counter() - started)


def given_repetition_penalty(penalty: float) -> DecodingChoice:
    """A penalty the user set: nothing is measured."""
    return DecodingChoice(penalty, "given", None, {}, 0, 0.0)
