"""The decoding default a pruned model ships with: the mildest repetition penalty that stops its loops.

Pruning leaves a model whose greedy text loops ("the matter of the matter of …") while its perplexity
still looks fair; a repetition penalty (CTRL's: a seen token's logit is divided by it when positive,
multiplied when negative) breaks the loops, and too strong a one garbles the text. So candidates are
tried mildest first on their own fixed prompts, against the dense model's text on them; the health
prompts (evaluation/generation.py), which are different, then judge the choice.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from torch import nn

from loraprune.evaluation.fidelity import DenseView
from loraprune.evaluation.generation import greedy_batch, health_prompts, repeated_ngram_fraction

CANDIDATES = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
# Not the run's own text: on mid-sentence Austen prompts the dense SmolLM2 repeats itself as much as
# a pruned one (0.34 of 4-grams), so a bar set there would pass a model that loops everywhere else.
TUNING_PROSE = (
    "The storm had passed by the time the ship reached",
    "Every summer the family travelled north to visit",
    "He had never trusted the new neighbour, because",
)
TUNING_CODE = (
    "def is_prime(n):\n    ",
    "To sort a list of dictionaries by a key in Python,",
    "import os\n\nfor name in os.listdir('.'):\n    ",
)
TUNING_FACTS = (
    "The chemical symbol for gold is",
    "The longest river in Africa is",
    "The human heart has four chambers:",
)
TUNING_INSTRUCTIONS = (
    "Describe a sunrise in three sentences.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
)


@dataclass
class DecodingChoice:
    """The repetition penalty chosen (1: none) and what each candidate scored on the tuning prompts."""

    repetition_penalty: float
    measured: bool  # False: given by --repetition-penalty
    reached_bar: bool  # the chosen penalty's repetition is at most dense's (else: the strongest tried)
    dense_repetition: float | None  # the dense model's score on the tuning prompts, decoded as its config says
    tried: dict[str, float]  # penalty -> the pruned model's repetition on the tuning prompts
    n_prompts: int
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        return asdict(self)


def tuning_prompts(tokenizer) -> list[str]:
    """The prompts the penalty is chosen on: the four kinds of the health prompts, none of them."""
    return [text for _, text in health_prompts(tokenizer, TUNING_PROSE, TUNING_CODE, TUNING_FACTS, TUNING_INSTRUCTIONS)]


def repetition_on(model: nn.Module, tokenizer, prompts: list[str], repetition_penalty: float | None = None) -> float:
    """Mean share of repeated 4-grams in the greedy continuations of ``prompts``."""
    continuations = greedy_batch(model, tokenizer, prompts, repetition_penalty=repetition_penalty)
    return sum(repeated_ngram_fraction(ids) for ids in continuations) / len(continuations)


def choose_repetition_penalty(model: nn.Module, tokenizer, prompts: list[str], dense: DenseView,
                              candidates: tuple[float, ...] = CANDIDATES) -> DecodingChoice:
    """The mildest candidate under which ``model`` repeats itself no more than its dense base (``dense()``: a
    context under which ``model`` is that base) does; the strongest if none does.

    The bar is dense's own score, not issue 16's dense + 0.05: that is the judged margin, and choosing at
    it left the quickstart model 0.052 above dense on the health prompts (1.05 against 1.1 now).
    """
    started = time.perf_counter()
    with dense():
        dense_repetition = repetition_on(model, tokenizer, prompts)
    tried = {}
    for penalty in candidates:
        tried[str(penalty)] = repetition_on(model, tokenizer, prompts, penalty)
        if tried[str(penalty)] <= dense_repetition:
            break
    reached = tried[str(penalty)] <= dense_repetition
    return DecodingChoice(penalty, True, reached, dense_repetition, tried, len(prompts), time.perf_counter() - started)


def given_repetition_penalty(penalty: float) -> DecodingChoice:
    """A penalty the user set: nothing is measured."""
    return DecodingChoice(penalty, False, True, None, {}, 0, 0.0)
