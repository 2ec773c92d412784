"""Generation health: greedy continuations of fixed prompts, scored by how much they repeat themselves.

A pruned model that loops ("the universe is not the universe, but the universe is not …") keeps a
tolerable perplexity but is useless as a chat model; the share of repeated 4-grams catches it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

NGRAM = 4
NEW_TOKENS = 64
BATCH = 12
PROSE = (
    "It is a truth universally acknowledged, that",
    "The old house at the end of the lane had",
    "She opened the letter slowly and read",
    "In the morning the village was quiet, and",
    "The history of the printing press begins",
)
CODE = (
    "def fibonacci(n):\n    ",
    "import json\n\nwith open('data.json') as f:\n    ",
    "To read a file line by line in Python,",
    "class Stack:\n    def __init__(self):\n        ",
    "The difference between a list and a tuple in Python is",
)
FACTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which",
    "The first person to walk on the moon was",
)
INSTRUCTIONS = (
    "Write a short poem about the sea.",
    "Explain what a black hole is in two sentences.",
    "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I make a cup of tea?",
)


@dataclass
class GenerationHealth:
    """Mean share of repeated 4-grams over the continuations, and the continuations themselves."""

    repetition: float
    n_prompts: int
    new_tokens: int
    seconds: float
    repetition_penalty: float | None = None  # the decoding's; None: the model's generation config
    samples: list[dict] = field(default_factory=list)  # {"prompt", "kind", "text", "repetition"}

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        return asdict(self)


def repeated_ngram_fraction(tokens: list, n: int = NGRAM) -> float:
    """Share of the n-grams of ``tokens`` that already occurred earlier in it (0: no repeats)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def health_prompts(tokenizer, prose: tuple[str, ...] = PROSE, code: tuple[str, ...] = CODE,
                   facts: tuple[str, ...] = FACTS,
                   instructions: tuple[str, ...] = INSTRUCTIONS) -> list[tuple[str, str]]:
    """(kind, prompt text) of every prompt; instructions are rendered with the tokenizer's chat template."""
    prompts = [("prose", p) for p in prose] + [("code", p) for p in code] + [("facts", p) for p in facts]
    for instruction in instructions:
        messages = [{"role": "user", "content": instruction}]
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            rendered = f"Question: {instruction}\nAnswer:"
        prompts.append(("chat", rendered))
    return prompts


@torch.inference_mode()
def greedy_batch(model: nn.Module, tokenizer, prompts: list[str], new_tokens: int = NEW_TOKENS,
                 repetition_penalty: float | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids only) of ``prompts``, batched with left padding.

    ``repetition_penalty`` None decodes as the model's generation config says; a number decodes
    with that penalty (1: none), applied as a runtime applies it to one unpadded prompt.
    """
    rows = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    device = next(model.parameters()).device
    pad = next(token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if token is not None)
    continuations = []
    for first in range(0, len(rows), BATCH):
        batch = rows[first : first + BATCH]
        width = max(len(row) for row in batch)
        padding = torch.tensor([width - len(row) for row in batch], device=device)
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in batch], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= padding[:, None]).long()
        options = {}
        if repetition_penalty is not None:  # 1.0 also overrides a penalty the model's config may set
            options["repetition_penalty"] = 1.0
            if repetition_penalty != 1.0:
                options["logits_processor"] = LogitsProcessorList([UnpaddedRepetitionPenalty(repetition_penalty,
                                                                                             padding)])
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=pad, **options)
        continuations += [_until_end(row.tolist(), tokenizer.eos_token_id, pad) for row in output[:, width:]]
    return continuations


class UnpaddedRepetitionPenalty(LogitsProcessor):
    """CTRL's repetition penalty as transformers applies it, over each row's tokens but not its left padding
    (transformers' own would also penalise the padding, which is the end-of-sequence token for many models)."""

    def __init__(self, penalty: float, padding: torch.Tensor):
        self.penalty = penalty
        self.padding = padding  # (batch,) left-padding length of each row

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        real = (positions[None, :] >= self.padding[:, None]).to(torch.int32)  # (batch, length)
        seen = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device).scatter_add_(1, input_ids, real) > 0
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)


def _until_end(ids: list[int], eos: int | None, pad: int) -> list[int]:
    """The generated ids up to (not including) the first end-of-sequence or padding token."""
    for i, token in enumerate(ids):
        if token in (eos, pad):
            return ids[:i]
    return ids


def generation_health(model: nn.Module, tokenizer, new_tokens: int = NEW_TOKENS,
                      repetition_penalty: float | None = None) -> GenerationHealth:
    """Greedy ``new_tokens`` continuations of every health prompt, scored by repeated 4-grams.

    ``repetition_penalty``: as :func:`greedy_batch` takes it.
    """
    started = time.perf_counter()
    kinds_prompts = health_prompts(tokenizer)
    continuations = greedy_batch(model, tokenizer, [p for _, p in kinds_prompts], new_tokens, repetition_penalty)
    samples = [{"kind": kind, "prompt": prompt, "text": tokenizer.decode(ids, skip_special_tokens=True),
                "repetition": repeated_ngram_fraction(ids)}
               for (kind, prompt), ids in zip(kinds_prompts, continuations)]
    repetition = sum(s["repetition"] for s in samples) / len(samples)
    return GenerationHealth(repetition, len(samples), new_tokens, time.perf_counter() - started, repetition_penalty,
                            samples)
