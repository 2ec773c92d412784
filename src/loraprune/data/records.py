"""Instruction and chat data: records with instruction/input/output fields or `messages` lists.

Read from .jsonl, .json, .parquet or a folder saved by `datasets` (save_to_disk), then tokenized
with a label per token: the response (Alpaca `output`, or the assistant turns of `messages`) keeps
its ids, everything else is IGNORE (-100), so training and perplexity score the responses only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from loraprune.data.tokens import IGNORE, adds_bos
from loraprune.errors import LoraPruneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
VALIDATION_FRACTION = 0.1  # records held out when the data has no validation part of its own
ALPACA_FIELDS = ("instruction", "output")  # "input" is optional
MESSAGES_FIELD = "messages"
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class InstructionData:
    """Records of one format: Alpaca-style instruction/output, or chat `messages`."""

    records: list[dict]
    kind: Literal["alpaca", "messages"]
    source: str

    def held_out(self, split: str) -> InstructionData:
        """The last VALIDATION_FRACTION of the records for validation, the rest for training."""
        if len(self.records) < 2:
            raise LoraPruneError(f"{self.source} has one record; give at least two, or a validation file")
        n_validation = max(1, round(len(self.records) * VALIDATION_FRACTION))
        cut = len(self.records) - n_validation
        part = self.records[:cut] if split == "train" else self.records[cut:]
        return InstructionData(part, self.kind, self.source)


def is_dataset_folder(path: Path) -> bool:
    """Whether `path` is a folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))


def read_records(path: Path) -> list[dict]:
    """The records of a .jsonl / .json / .parquet file or a save_to_disk folder (a Dataset)."""
    if path.is_dir():
        return _dataset_rows(path)
    if path.suffix == ".parquet":
        try:
            from pyarrow import parquet
        except ImportError as e:
            raise LoraPruneError(f"reading {path} needs pyarrow: pip install 'loraprune[eval]'") from e
        try:
            return parquet.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise LoraPruneError(f"{path} is not a readable Parquet file ({e}); check the file") from e
    return parse_json_records(path.read_text(encoding="utf-8"), path)


def parse_json_records(text: str, path: Path) -> list:
    """The records of a .json file (a list) or a .jsonl file (one per line)."""
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraPruneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(records, list):
            raise LoraPruneError(f'{path} must hold a JSON list of records, e.g. [{{"instruction": ...}}]')
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LoraPruneError(f"{path} line {number} is not valid JSON ({e.msg})") from e
    return records


def _dataset_rows(folder: Path, split: str | None = None) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise LoraPruneError(f"reading the dataset folder {folder} needs datasets: pip install 'loraprune[eval]'") from e
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise LoraPruneError(f"dataset folder {folder} has splits {', '.join(loaded)}; "
                                 f"it needs a {split or 'train'!r} split")
        loaded = loaded[split]
    return loaded.to_list()


def dataset_splits(folder: Path) -> list[str]:
    """The split names of a saved DatasetDict (empty for a single saved Dataset)."""
    info = folder / "dataset_dict.json"
    return json.loads(info.read_text()).get("splits", []) if info.is_file() else []


def dataset_split_rows(folder: Path, split: str) -> list[dict]:
    """The rows of one split of a saved DatasetDict."""
    return _dataset_rows(folder, split)


def classify(records: list[dict], source: str) -> InstructionData:
    """Records as InstructionData, refusing records without the fields of one known format."""
    if not records:
        raise LoraPruneError(f"{source} holds no records")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise LoraPruneError(f"{source} record {number} is not an object with fields")
    first = records[0]
    kind = "messages" if MESSAGES_FIELD in first else "alpaca"
    for number, record in enumerate(records, start=1):
        if kind == "messages":
            if not _valid_messages(record.get(MESSAGES_FIELD)):
                raise LoraPruneError(f"{source} record {number}: {MESSAGES_FIELD!r} must be a list of "
                                     "{role, content} objects with at least one assistant turn")
        elif not all(isinstance(record.get(name), str) for name in ALPACA_FIELDS):
            found = ", ".join(sorted(record)) or "none"
            raise LoraPruneError(f"{source} record {number} has fields {found}; expected 'text', "
                                 "'instruction' + 'output' (and optional 'input'), or 'messages'")
    return InstructionData(records, kind, source)


def _valid_messages(messages) -> bool:
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)
            and any(m["role"] == "assistant" for m in messages))


def labelled_ids(tokenizer: PreTrainedTokenizerBase, data: InstructionData) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of all records joined; labels are the ids on response tokens, IGNORE elsewhere."""
    if data.kind == "messages" and not tokenizer.chat_template:
        raise LoraPruneError(f"{data.source} holds chat messages but the tokenizer has no chat template; "
                             "use a chat model or instruction/output records")
    ids: list[int] = []
    labels: list[int] = []
    for record in data.records:
        pieces = _alpaca_pieces(tokenizer, record) if data.kind == "alpaca" else _chat_pieces(tokenizer, record)
        for piece_ids, scored in pieces:
            ids.extend(piece_ids)
            labels.extend(piece_ids if scored else [IGNORE] * len(piece_ids))
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def _alpaca_pieces(tokenizer: PreTrainedTokenizerBase, record: dict) -> list[tuple[list[int], bool]]:
    """The Stanford Alpaca prompt (not scored), then the output and EOS (scored)."""
    template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_WITHOUT_INPUT
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    prompt = bos + _ids(tokenizer, template.format(instruction=record["instruction"], input=record.get("input", "")))
    response = _ids(tokenizer, record["output"])
    if tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    return [(prompt, False), (response, True)]


def _chat_pieces(tokenizer: PreTrainedTokenizerBase, record: dict) -> list[tuple[list[int], bool]]:
    """The conversation rendered by the chat template, cut where each assistant turn starts and ends."""
    messages = record[MESSAGES_FIELD]
    rendered = _render(tokenizer, messages)
    pieces, position = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:index], generation_prompt=True)) if index else 0
        end = len(_render(tokenizer, messages[: index + 1]))
        if not (position <= start <= end <= len(rendered)) or not rendered.startswith(
                _render(tokenizer, messages[: index + 1])):
            raise LoraPruneError("the tokenizer's chat template does not render a conversation as the "
                                 "sum of its turns; use instruction/output records instead")
        pieces += [(_ids(tokenizer, rendered[position:start]), False), (_ids(tokenizer, rendered[start:end]), True)]
        position = end
    pieces.append((_ids(tokenizer, rendered[position:]), False))
    return [(piece, scored) for piece, scored in pieces if piece]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

