"""Perplexity of a causal language model on packed token blocks.

The paper's protocol: non-overlapping windows, mean NLL over every predicted token of every window, exp.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loraprune.data import check_packing_args
from loraprune.data.blocks import corpus_blocks, split_labels
from loraprune.data.corpora import load_corpus
from loraprune.data.tokens import IGNORE
from loraprune.errors import LoraPruneError
from loraprune.models.loading import BUILTIN_MODEL, load_model, parse_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class PerplexityResult:
    """A perplexity and everything needed to read it: which text, window length, token count."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    n_tokens: int  # predicted tokens: n_windows * (seq_len - 1), or the labelled (response) ones
    seq_len: int  # window length in tokens
    n_windows: int
    seconds: float
    tokens_per_second: float  # input tokens (n_windows * seq_len) run through the model per second
    data: str | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        return asdict(self)


def perplexity(
    model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> PerplexityResult:
    """Perplexity of `model` over (n_windows, seq_len) token blocks, each window scored alone.

    Labelled (n_windows, 2, seq_len) blocks (instruction data) score only the labelled tokens.
    """
    if blocks.ndim not in (2, 3) or blocks.shape[0] == 0 or blocks.shape[-1] < 2:
        raise LoraPruneError(
            f"perplexity needs blocks of shape (n_windows >= 1, seq_len >= 2), got {tuple(blocks.shape)}"
        )
    if batch_size <= 0:
        raise LoraPruneError(f"--batch-size must be a positive number, got {batch_size}")
    n_windows, seq_len = blocks.shape[0], blocks.shape[-1]
    n_tokens = 0
    device = next(model.parameters()).device
    total_nll = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        batches = range(0, n_windows, batch_size)
        for first in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            batch, labels = split_labels(blocks[first : first + batch_size].to(device))
            targets = (batch if labels is None else labels)[:, 1:].flatten()
            logits = model(input_ids=batch, use_cache=False).logits  # (batch, seq_len, vocab)
            # Token t is predicted from tokens < t, so the first token of each window is not scored.
            total_nll += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum", ignore_index=IGNORE
            ).item()
            n_tokens += int((targets != IGNORE).sum())
    seconds = time.perf_counter() - start
    nll = total_nll / n_tokens
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        n_tokens=n_tokens,
        seq_len=seq_len,
        n_windows=n_windows,
        seconds=seconds,
        tokens_per_second=n_windows * seq_len / seconds if seconds > 0 else float("inf"),
    )


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: str,
    seq_len: int,
    max_tokens: int | None = None,
    batch_size: int = 1,
    split: str = "validation",
    austen_dir: str | Path | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a loaded model on the `split` of corpus `data` (see data.load_text)."""
    check_packing_args(seq_len, max_tokens)
    blocks = corpus_blocks(tokenizer, load_corpus(data, split, austen_dir), seq_len, max_tokens)
    result = perplexity(model, blocks, batch_size=batch_size, progress=progress)
    result.data, result.split = data, split
    return result


def evaluate_model(
    model: str = BUILTIN_MODEL,
    data: str = "pydoc",
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 1,
    dtype: str = "float32",
    split: str = "validation",
    austen_dir: str | Path | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Load a model by name or path and measure its perplexity; cheap checks come before loading."""
    check_packing_args(seq_len, max_tokens)
    if batch_size <= 0:
        raise LoraPruneError(f"--batch-size must be a positive number, got {batch_size}")
    parse_dtype(dtype)
    corpus = load_corpus(data, split, austen_dir)
    loaded, tokenizer = load_model(model, dtype)
    blocks = corpus_blocks(tokenizer, corpus, seq_len, max_tokens)
    result = perplexity(loaded, blocks, batch_size=batch_size, progress=progress)
    result.data, result.split = data, split
    return result
