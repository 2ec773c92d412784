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
from statistics import fmean

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


# How much more, on average over the prompts, the pruned text may repeat than dense's: a loop on one
# prompt of twelve adds about 0.03, a stray repeated phrase about 0.002.
EXCESS_TOLERANCE = 0.01


@dataclass
class DecodingChoice:
    """The repetition penalty chosen (1: none) and what each candidate scored on the tuning prompts."""

    repetition_penalty: float
    measured: bool  # False: given by --repetition-penalty
    reached_bar: bool  # the chosen penalty's excess is within EXCESS_TOLERANCE (else: the strongest tried)
    dense_repetition: float | None  # the dense model's mean on the tuning prompts, decoded as its config says
    dense_per_prompt: list[float]  # ... and on each of them
    tried: dict[str, float]  # penalty -> the pruned model's mean repetition on the tuning prompts
    excess: dict[str, float]  # penalty -> its repetition beyond dense's, prompt by prompt (excess_repetition)
    n_prompts: int
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        return asdict(self)


def tuning_prompts(tokenizer) -> list[str]:
    """The prompts the penalty is chosen on: the four kinds of the health prompts, none of them."""
    return [text for _, text in health_prompts(tokenizer, TUNING_PROSE, TUNING_CODE, TUNING_FACTS, TUNING_INSTRUCTIONS)]


def repetition_per_prompt(model: nn.Module, tokenizer, prompts: list[str],
                          repetition_penalty: float | None = None) -> list[float]:
    """Share of repeated 4-grams in the greedy continuation of each of ``prompts``."""
    continuations = greedy_batch(model, tokenizer, prompts, repetition_penalty=repetition_penalty)
    return [repeated_ngram_fraction(ids) for ids in continuations]


def repetition_on(model: nn.Module, tokenizer, prompts: list[str], repetition_penalty: float | None = None) -> float:
    """Mean share of repeated 4-grams in the greedy continuations of ``prompts``."""
    return fmean(repetition_per_prompt(model, tokenizer, prompts, repetition_penalty))


def excess_repetition(pruned: list[float], dense: list[float]) -> float:
    """Mean over prompts of how much more the pruned text repeats than dense's on the same prompt.

    Prompt by prompt, not mean against mean: dense itself repeats on some prompts (a list, a refrain),
    and a pruned model that stops repeating there must not buy a loop on another prompt with it.
    """
    return sum(max(0.0, p - d) for p, d in zip(pruned, dense, strict=True)) / len(pruned)


def choose_repetition_penalty(model: nn.Module, tokenizer, prompts: list[str], dense: DenseView,
                              candidates: tuple[float, ...] = CANDIDATES) -> DecodingChoice:
    """The mildest candidate under which ``model`` repeats itself, prompt by prompt, no more than its dense base
    (``dense()``: a context under which ``model`` is that base) does, within EXCESS_TOLERANCE; the strongest
    if none does.

    Mean against mean was the bar first: it left the Austen-trained 20 % model looping on 4 of the 21 health
    prompts (repetition 0.138 at 1.1, dense 0.088), its lower repetition on the prompts where dense repeats
    a list hiding a loop elsewhere.
    """
    started = time.perf_counter()
    with dense():
        dense_scores = repetition_per_prompt(model, tokenizer, prompts)
    tried, excess = {}, {}
    for penalty in candidates:
        scores = repetition_per_prompt(model, tokenizer, prompts, penalty)
        tried[str(penalty)] = fmean(scores)
        excess[str(penalty)] = excess_repetition(scores, dense_scores)
        if excess[str(penalty)] <= EXCESS_TOLERANCE:
            break
    return DecodingChoice(penalty, True, excess[str(penalty)] <= EXCESS_TOLERANCE, fmean(dense_scores),
                          dense_scores, tried, excess, len(prompts), time.perf_counter() - started)


def given_repetition_penalty(penalty: float) -> DecodingChoice:
    """A penalty the user set: nothing is measured."""
    return DecodingChoice(penalty, False, True, None, [], {}, {}, 0, 0.0)
