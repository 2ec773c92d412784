"""Text corpora by name, and their packing into fixed-length token blocks.

Names: austen, pydoc and text:PATH work offline; wikitext2, ptb, c4, alpaca need `datasets` + network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from loraprune.cache import cache_root
from loraprune.errors import LoraPruneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "validation")
AUSTEN_TRAIN = ("emma", "mansfieldpark", "prideandprejudice", "senseandsensibility")
AUSTEN_VALIDATION = ("northangerabbey",)
HUB_CORPORA = ("wikitext2", "ptb", "c4", "alpaca")
DATA_NAMES = ("austen", "pydoc", "text:PATH", *HUB_CORPORA)
PYDOC_TRAIN_FRACTION = 0.9
# Bump when the tokenization below changes, so cached token ids are never reused across versions.
TOKEN_CACHE_VERSION = 1
CHUNK_CHARS = 2000


def load_text(name: str, split: str, austen_dir: str | Path | None = None) -> str:
    """Return the raw text of corpus `name` for `split` ("train" or "validation")."""
    if split not in SPLITS:
        raise LoraPruneError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if name == "austen":
        return _austen_text(split, austen_dir)
    if name == "pydoc":
        return _pydoc_text(split)
    if name.startswith("text:"):
        return _user_text(name[len("text:") :], split)
    if name in HUB_CORPORA:
        return _hub_text(name, split)
    raise LoraPruneError(f"unknown data {name!r}; use one of: {', '.join(DATA_NAMES)}")


def find_austen_dir(austen_dir: str | Path | None = None) -> Path:
    """Locate the Austen novels: the argument, $LORAPRUNE_AUSTEN_DIR, or a shared/data/austen above."""
    explicit = austen_dir or os.environ.get("LORAPRUNE_AUSTEN_DIR")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise LoraPruneError(
                f"Austen folder {str(path)!r} does not exist; point --austen-dir "
                "(or LORAPRUNE_AUSTEN_DIR) at the folder holding emma.txt etc."
            )
        return path
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data" / "austen"
            if candidate.is_dir():
                return candidate
    raise LoraPruneError(
        "cannot find the Austen novels (shared/data/austen in this folder or any parent); "
        "pass --austen-dir DIR or set LORAPRUNE_AUSTEN_DIR, or use --data pydoc"
    )


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


def check_packing_args(seq_len: int, max_tokens: int | None = None) -> None:
    """Reject a block length or token budget that cannot make a block."""
    if seq_len <= 0:
        raise LoraPruneError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    if max_tokens is not None and max_tokens <= 0:
        raise LoraPruneError(f"--max-tokens must be a positive number of tokens, got {max_tokens}")


def shuffled_blocks(blocks: torch.Tensor, seed: int) -> torch.Tensor:
    """Return the blocks in an order that depends only on `seed`."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(blocks.shape[0], generator=generator)
    return blocks[order]


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
    if _adds_bos(tokenizer):
        ids.insert(0, tokenizer.bos_token_id)
    return np.asarray(ids, dtype=np.int32)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
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


def _austen_text(split: str, austen_dir: str | Path | None) -> str:
    """Four novels for training, Northanger Abbey for validation, in a fixed order."""
    folder = find_austen_dir(austen_dir)
    names = AUSTEN_TRAIN if split == "train" else AUSTEN_VALIDATION
    texts = []
    for name in names:
        path = folder / f"{name}.txt"
        if not path.is_file():
            raise LoraPruneError(
                f"{path} is missing; the Austen folder needs "
                f"{', '.join(n + '.txt' for n in AUSTEN_TRAIN + AUSTEN_VALIDATION)}"
            )
        texts.append(_read_text_file(path))
    return "\n\n".join(texts)


def _pydoc_text(split: str) -> str:
    """CPython's help topics: the first 90% (sorted by topic name) train, the rest validation."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    n_train = int(len(keys) * PYDOC_TRAIN_FRACTION)
    chosen = keys[:n_train] if split == "train" else keys[n_train:]
    return "\n\n".join(topics[key] for key in chosen)


def _user_text(path_text: str, split: str) -> str:
    """A .txt or .jsonl file, or a folder of .txt files (optionally with train/validation parts)."""
    if not path_text:
        raise LoraPruneError("--data text:PATH needs a path after 'text:'")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise LoraPruneError(f"text path {path_text!r} does not exist; check the path")
    if path.is_file():
        return _read_corpus_file(path)
    split_part = _split_part(path, split)
    if split_part is not None:
        return _user_text(str(split_part), split)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise LoraPruneError(f"folder {path_text!r} holds no .txt files")
    return "\n\n".join(_read_text_file(p) for p in files)


def _split_part(folder: Path, split: str) -> Path | None:
    """A folder's own split: a `train`/`validation` subfolder, or train.txt / validation.jsonl etc."""
    has_splits = any((folder / f"{s}{suffix}").exists() for s in SPLITS for suffix in ("", ".txt", ".jsonl"))
    if not has_splits:
        return None
    for suffix in ("", ".txt", ".jsonl"):
        candidate = folder / f"{split}{suffix}"
        if candidate.exists():
            return candidate
    raise LoraPruneError(f"folder {str(folder)!r} has split parts but none for {split!r}")


def _read_corpus_file(path: Path) -> str:
    """Read a .jsonl file's `text` fields (joined by blank lines) or any other file as text."""
    if path.suffix != ".jsonl":
        return _read_text_file(path)
    texts = []
    for number, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoraPruneError(f"{path} line {number} is not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LoraPruneError(f'{path} line {number} has no string "text" field')
        texts.append(record["text"])
    text = "\n\n".join(texts)
    if not text.strip():
        raise LoraPruneError(f"{path} holds no text")
    return text


def _read_text_file(path: Path) -> str:
    """Read a UTF-8 text file, refusing binary, undecodable, unreadable or empty files."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LoraPruneError(f"cannot read {path} ({e.strerror}); check its permissions") from e
    if b"\x00" in raw:
        raise LoraPruneError(f"{path} is a binary file, not text; use a UTF-8 .txt or .jsonl file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoraPruneError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from e
    if not text.strip():
        raise LoraPruneError(f"{path} is empty; give a file with text in it")
    return text


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_VALIDATION_FRACTION = 0.02
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
# SparseGPT / LLM-Pruner use the first 1100 validation documents; train takes a comparable slice.
C4_DOCUMENTS = {"train": 5000, "validation": 1100}


def _hub_text(name: str, split: str) -> str:
    """Fetch a standard corpus through the `datasets` library (needs network or its cache)."""
    try:
        import datasets
    except ImportError as e:
        raise LoraPruneError(f"--data {name} needs the datasets library: pip install 'loraprune[eval]'") from e
    try:
        if name == "wikitext2":
            # The paper reports WikiText-2 perplexity on the test split.
            hub_split = "train" if split == "train" else "test"
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)
            return "\n\n".join(rows["text"])
        if name == "ptb":
            rows = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            return " ".join(rows["sentence"])
        if name == "c4":
            rows = datasets.load_dataset("allenai/c4", data_files={split: C4_FILES[split]}, split=split)
            return " ".join(rows.select(range(C4_DOCUMENTS[split]))["text"])
        rows = datasets.load_dataset("yahma/alpaca-cleaned", split="train")
        n_validation = max(1, int(len(rows) * ALPACA_VALIDATION_FRACTION))
        n_train = len(rows) - n_validation
        part = range(n_train) if split == "train" else range(n_train, len(rows))
        return "\n\n".join(_alpaca_prompt(rows[i]) for i in part)
    except LoraPruneError:
        raise
    except Exception as e:
        raise LoraPruneError(
            f"cannot load {name!r}: the dataset hub cannot be reached ({_first_line(e)}); "
            "use --data text:PATH with a local file, or --data austen / pydoc"
        ) from e


def _alpaca_prompt(example: dict) -> str:
    """One Alpaca example in the Stanford Alpaca prompt format, response included."""
    template = ALPACA_WITH_INPUT if example.get("input") else ALPACA_WITHOUT_INPUT
    return template.format(**example)


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message, for embedding in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
