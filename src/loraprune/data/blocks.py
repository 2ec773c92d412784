"""Any corpus to training or evaluation blocks: text packs to (n, seq_len) ids, instruction and
chat records to (n, 2, seq_len) ids and labels (the prompt's labels IGNORE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from loraprune.data.records import InstructionData, labelled_ids
from loraprune.data.tokens import labelled_blocks, token_blocks, tokenize_cached

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def corpus_blocks(tokenizer: PreTrainedTokenizerBase, corpus: str | InstructionData, seq_len: int,
                  max_tokens: int | None = None) -> torch.Tensor:
    """Blocks of a text, (n, seq_len), or of records with their labels, (n, 2, seq_len)."""
    if isinstance(corpus, str):
        return token_blocks(tokenizer, corpus, seq_len, max_tokens)
    return labelled_blocks(*labelled_ids(tokenizer, corpus), seq_len, max_tokens)


def corpus_ids(tokenizer: PreTrainedTokenizerBase, corpus: str | InstructionData) -> np.ndarray:
    """All token ids of a corpus in order (records: prompts and responses alike)."""
    if isinstance(corpus, str):
        return tokenize_cached(tokenizer, corpus)
    return labelled_ids(tokenizer, corpus)[0]


def split_labels(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input ids, labels or None) of (batch, seq_len) or (batch, 2, seq_len) blocks."""
    if blocks.ndim == 3:
        return blocks[:, 0], blocks[:, 1]
    return blocks, None
