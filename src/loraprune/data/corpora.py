"""Text corpora by name: the train and validation text of each, read offline where possible.

Names: austen, pydoc and text:PATH work offline; wikitext2, ptb, c4, alpaca need `datasets` + network.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraprune.data.records import (
    InstructionData,
    classify,
    dataset_split_rows,
    dataset_splits,
    is_dataset_folder,
    parse_json_records,
    read_records,
)
from loraprune.errors import LoraPruneError, first_line

SPLITS = ("train", "validation")
AUSTEN_TRAIN = ("emma", "mansfieldpark", "prideandprejudice", "senseandsensibility")
AUSTEN_VALIDATION = ("northangerabbey",)
HUB_CORPORA = ("wikitext2", "ptb", "c4", "alpaca")
DATA_NAMES = ("austen", "pydoc", "text:PATH", *HUB_CORPORA)
SELF_FORMS = ("self", "NAME+self")  # text the model generates while pruning (data/generated.py)
PYDOC_TRAIN_FRACTION = 0.9
SPLIT_SUFFIXES = ("", ".txt", ".jsonl", ".json", ".parquet")


def load_text(name: str, split: str, austen_dir: str | Path | None = None) -> str:
    """Return the raw text of corpus `name` for `split` ("train" or "validation")."""
    corpus = load_corpus(name, split, austen_dir)
    if isinstance(corpus, InstructionData):
        raise LoraPruneError(f"--data {name} holds {corpus.kind} records, not plain text; "
                             "this command reads text (.txt, or .jsonl with a 'text' field)")
    return corpus


def load_corpus(name: str, split: str, austen_dir: str | Path | None = None) -> str | InstructionData:
    """The text of corpus `name` for `split`, or its instruction/chat records (text:PATH only)."""
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
    if name == "self" or name.startswith("self+") or name.endswith("+self"):
        raise LoraPruneError(f"--data {name} is text the model generates while pruning (loraprune prune); "
                             f"to read a text use one of: {', '.join(DATA_NAMES)}")
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


def _user_text(path_text: str, split: str, is_split_part: bool = False) -> str | InstructionData:
    """A .txt / .jsonl / .json / .parquet file, a save_to_disk folder, or a folder of .txt files.

    Text is the same for both splits unless the folder has train/validation parts; instruction
    records without such parts hold out their last share for validation.
    """
    if not path_text:
        raise LoraPruneError("--data text:PATH needs a path after 'text:'")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise LoraPruneError(f"text path {path_text!r} does not exist; check the path")
    if is_dataset_folder(path):
        if split in dataset_splits(path):
            return classify(dataset_split_rows(path, split), f"{path} ({split})")
        rows = dataset_split_rows(path, "train") if dataset_splits(path) else read_records(path)
        return classify(rows, str(path)).held_out(split)
    if path.is_file():
        corpus = _read_corpus_file(path)
        if isinstance(corpus, InstructionData) and not is_split_part:
            return corpus.held_out(split)
        return corpus
    split_part = _split_part(path, split)
    if split_part is not None:
        return _user_text(str(split_part), split, is_split_part=True)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise LoraPruneError(f"folder {path_text!r} holds no .txt files")
    return "\n\n".join(_read_text_file(p) for p in files)


def _split_part(folder: Path, split: str) -> Path | None:
    """A folder's own split: a `train`/`validation` subfolder, or train.txt / validation.jsonl etc."""
    has_splits = any((folder / f"{s}{suffix}").exists() for s in SPLITS for suffix in SPLIT_SUFFIXES)
    if not has_splits:
        return None
    for suffix in SPLIT_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.exists():
            return candidate
    raise LoraPruneError(f"folder {str(folder)!r} has split parts but none for {split!r}")


def _read_corpus_file(path: Path) -> str | InstructionData:
    """Text, a .jsonl file's `text` fields (joined by blank lines), or instruction/chat records."""
    if path.suffix == ".parquet":
        return classify(read_records(path), str(path))
    if path.suffix not in (".json", ".jsonl"):
        return _read_text_file(path)
    records = parse_json_records(_read_text_file(path), path)
    if path.suffix == ".json" or not (records and isinstance(records[0], dict) and "text" in records[0]):
        return classify(records, str(path))
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LoraPruneError(f'{path} record {number} has no string "text" field')
    text = "\n\n".join(record["text"] for record in records)
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
            f"cannot load {name!r}: the dataset hub cannot be reached ({first_line(e)}); "
            "use --data text:PATH with a local file, or --data austen / pydoc"
        ) from e


def _alpaca_prompt(example: dict) -> str:
    """One Alpaca example in the Stanford Alpaca prompt format, response included."""
    template = ALPACA_WITH_INPUT if example.get("input") else ALPACA_WITHOUT_INPUT
    return template.format(**example)

