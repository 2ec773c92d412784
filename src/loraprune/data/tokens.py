"""Tokenize a text once (cached on disk) and pack its ids into fixed-length blocks.

Long texts are tokenized in paragraph-sized chunks, which gives the ids one call would give.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import TYPE_CHECKING

import numpy as np
import torch

from loraprune.cache import cache_root
from loraprune.errors import LoraPruneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Bump when the tokenization below changes, so cached token ids are never reused across versions.
TOKEN_CACHE_VERSION = 1
CHUNK_CHARS = 2000
IGNORE = -100  # label of a token that is not scored (a prompt's), as in transformers' losses


def token_blocks(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Tokenize `text` once and cut it into non-overlapping (n_blocks, seq_len) blocks."""
    check_packing_args(seq_len, max_tokens)
    ids = tokenize_cached(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise LoraPruneError(
            f"text has {len(ids)} tokens, fewer than one block of {seq_len}; use a longer text or a smaller --seq-len"
        )
    # The remainder after the last full block is dropped, as in the paper's evaluation.
    return torch.from_numpy(ids[: n_blocks * seq_len].astype(np.int64)).view(n_blocks, seq_len)


def labelled_blocks(ids: np.ndarray, labels: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Pack ids and their labels into (n_blocks, 2, seq_len) blocks, dropping blocks that score nothing."""
    check_packing_args(seq_len, max_tokens)
    if max_tokens is not None:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
    n_blocks = len(ids) // seq_len
    pairs = np.stack([ids[: n_blocks * seq_len], labels[: n_blocks * seq_len]]).astype(np.int64)
    blocks = torch.from_numpy(pairs).view(2, n_blocks, seq_len).transpose(0, 1).contiguous()
    # A block whose predicted positions are all unscored adds nothing and would make a 0/0 loss.
    blocks = blocks[(blocks[:, 1, 1:] != IGNORE).any(dim=1)]
    if len(blocks) == 0:
        raise LoraPruneError(
            f"the records make {len(ids)} tokens, not one block of {seq_len} with a response in it; "
            "use more records or a smaller --seq-len")
    return blocks


def check_packing_args(seq_len: int, max_tokens: int | None = None) -> None:
    """Reject a block length or token budget that cannot make a block."""
    if seq_len <= 0:
        raise LoraPruneError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    if max_tokens is not None and max_tokens <= 0:
        raise LoraPruneError(f"--max-tokens must be a positive number of tokens, got {max_tokens}")


def tokenize_cached(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """Token ids of `text` (int32), read from the on-disk cache when this text was seen before."""
    key = hashlib.sha256(
        f"{TOKEN_CACHE_VERSION}|{_tokenizer_fingerprint(tokenizer)}|".encode()
        + hashlib.sha256(text.encode("utf-8")).digest()
    ).hexdigest()
    path = cache_root() / "tokens" / f"{key[:32]}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    ids = tokenize(tokenizer, text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.save(f, ids)
        os.replace(f.name, path)
    except OSError:
        pass  # an unwritable cache only costs time
    return ids


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """Token ids of `text` as the tokenizer would give for the whole string, computed in chunks."""
    # Chunks at paragraph boundaries keep the tokenizer off its slow path for huge strings and
    # below its max-length warning; token boundaries at a paragraph break are nearly always there.
    chunks = _chunks(text, CHUNK_CHARS)
    pieces = tokenizer(chunks, add_special_tokens=False)["input_ids"] if chunks else []
    ids = [token for piece in pieces for token in piece]
    # A BOS only if the tokenizer itself puts one before a text (LLaMA does, SmolLM2 does not),
    # once at the very start: the paper tokenizes the whole joined corpus in one call.
    if adds_bos(tokenizer):
        ids.insert(0, tokenizer.bos_token_id)
    return np.asarray(ids, dtype=np.int32)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts a plain call's output with its BOS token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _chunks(text: str, max_chars: int) -> list[str]:
    """Split text into pieces of at most ~max_chars, cutting at paragraph breaks or else at spaces."""
    # Cut "a\n\nb" as "a\n" + "\nb": byte-level BPE splits the whole string the same way.
    paragraphs = re.split(r"(?<=\n)(?=\n\S)", text)
    chunks: list[str] = []
    current = ""
    for paragraph in paragraphs:
        while len(paragraph) > max_chars:
            # At a single space after a word, never inside a run of spaces (BPE keeps runs whole).
            spaces = [m.start() for m in re.finditer(r"(?<=\S) (?! )", paragraph[:max_chars])]
            cut = spaces[-1] if spaces and spaces[-1] > 0 else max_chars
            if current:
                chunks.append(current)
                current = ""
            chunks.append(paragraph[:cut])
            paragraph = paragraph[cut:]
        if current and len(current) + len(paragraph) > max_chars:
            chunks.append(current)
            current = ""
        current += paragraph
    if current:
        chunks.append(current)
    return chunks


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the tokenizer would split text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        description = backend.to_str()
    else:
        description = json.dumps(sorted(tokenizer.get_vocab().items()))
    identity = f"{type(tokenizer).__name__}|{tokenizer.bos_token_id}|{description}"
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()
