"""Tests for corpora and packing: block shapes, no overlap, dropped remainder, errors, shuffling.

Uses an in-memory word-level tokenizer so that token ids are known in advance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loraprune.data import corpora, load_text, token_blocks, tokenize, tokenize_cached, tokens
from loraprune.errors import LoraPruneError
from tests.conftest import build_word_tokenizer


def numbers(n: int) -> str:
    """A text of n known words, w0 w1 ... (token id of w{i} is i + 2)."""
    return " ".join(f"w{i % 100}" for i in range(n))


def test_blocks_are_consecutive_non_overlapping_and_drop_the_remainder(number_tokenizer):
    blocks = token_blocks(number_tokenizer, numbers(23), seq_len=5)
    assert blocks.shape == (4, 5) and blocks.dtype == torch.int64
    assert blocks.flatten().tolist() == [i + 2 for i in range(20)]


def test_max_tokens_limits_the_stream_before_packing(number_tokenizer):
    blocks = token_blocks(number_tokenizer, numbers(50), seq_len=4, max_tokens=10)
    assert blocks.shape == (2, 4)
    assert blocks.flatten().tolist() == [i + 2 for i in range(8)]


def test_bos_is_added_once_at_the_start_only_when_the_tokenizer_adds_one():
    with_bos = build_word_tokenizer(["a", "b"], bos=True)
    without_bos = build_word_tokenizer(["a", "b"], bos=False)
    text = "a b\n\n" * 3000  # many chunks
    ids = tokenize(with_bos, text)
    assert ids[0] == with_bos.bos_token_id and (ids[1:] != with_bos.bos_token_id).all()
    assert len(ids) == 6001
    assert tokenize(without_bos, text).tolist() == ids[1:].tolist()


def test_chunked_tokenization_equals_whole_string_tokenization(number_tokenizer):
    text = "\n\n".join(numbers(300) for _ in range(40)) + "  " + "w1   " * 2000
    whole = number_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize(number_tokenizer, text).tolist() == whole
    assert "".join(tokens._chunks(text, 100)) == text


def test_text_shorter_than_one_block_names_the_fix(number_tokenizer):
    with pytest.raises(LoraPruneError, match="text has 3 tokens, fewer than one block of 8"):
        token_blocks(number_tokenizer, numbers(3), seq_len=8)


@pytest.mark.parametrize("seq_len", [0, -4])
def test_non_positive_seq_len_is_refused(number_tokenizer, seq_len):
    with pytest.raises(LoraPruneError, match="--seq-len"):
        token_blocks(number_tokenizer, numbers(10), seq_len=seq_len)


def test_non_positive_max_tokens_is_refused(number_tokenizer):
    with pytest.raises(LoraPruneError, match="--max-tokens"):
        token_blocks(number_tokenizer, numbers(10), seq_len=2, max_tokens=0)


def test_token_ids_are_cached_on_disk_and_reused(number_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path))
    first = tokenize_cached(number_tokenizer, numbers(30))
    files = list((tmp_path / "tokens").glob("*.npy"))
    assert len(files) == 1
    np.save(files[0], first * 0 + 7)  # a reused cache would now answer sevens
    assert (tokenize_cached(number_tokenizer, numbers(30)) == 7).all()
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1
    other = build_word_tokenizer(["w5", "w1"])
    tokenize_cached(other, numbers(30))
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2  # another tokenizer, another key


def test_pydoc_splits_are_disjoint_and_deterministic():
    train, validation = load_text("pydoc", "train"), load_text("pydoc", "validation")
    assert len(train) > 5 * len(validation) > 0
    assert validation not in train
    assert load_text("pydoc", "validation") == validation


def test_austen_validation_is_northanger_abbey_and_train_the_other_four(austen_dir):
    validation = load_text("austen", "validation", austen_dir)
    assert validation == (austen_dir / "northangerabbey.txt").read_text(encoding="utf-8")
    train = load_text("austen", "train")  # found without the argument, as the CLI does
    assert train.startswith((austen_dir / "emma.txt").read_text(encoding="utf-8")[:1000])
    assert len(train) > 2_000_000


def test_austen_dir_from_environment_variable(tmp_path, monkeypatch):
    for name in corpora.AUSTEN_VALIDATION:
        (tmp_path / f"{name}.txt").write_text("It is a truth universally acknowledged.")
    monkeypatch.setenv("LORAPRUNE_AUSTEN_DIR", str(tmp_path))
    assert load_text("austen", "validation").startswith("It is a truth")


def test_missing_austen_dir_says_how_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPRUNE_AUSTEN_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(LoraPruneError, match="--austen-dir"):
        load_text("austen", "validation")


def test_text_file_folder_and_jsonl_are_read(tmp_path):
    (tmp_path / "one.txt").write_text("hello world")
    assert load_text(f"text:{tmp_path / 'one.txt'}", "train") == "hello world"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("second")
    (folder / "a.txt").write_text("first")
    (folder / "notes.md").write_text("ignored")
    assert load_text(f"text:{folder}", "validation") == "first\n\nsecond"
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}))
    assert load_text(f"text:{jsonl}", "train") == "row one\n\nrow two"


def test_folder_with_split_parts_gives_each_split_its_own_text(tmp_path):
    (tmp_path / "train.txt").write_text("for training")
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "v.txt").write_text("for validation")
    assert load_text(f"text:{tmp_path}", "train") == "for training"
    assert load_text(f"text:{tmp_path}", "validation") == "for validation"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"  \n\n ", "is empty"),
        (b"text\x00with nul", "binary"),
        (b"caf\xe9", "not UTF-8"),
    ],
)
def test_unusable_text_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(LoraPruneError, match=message):
        load_text(f"text:{path}", "train")


def test_jsonl_without_text_field_names_the_record(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(LoraPruneError, match="record 2 has no string \"text\" field"):
        load_text(f"text:{path}", "train")


def test_missing_text_path_and_unknown_names_are_refused(tmp_path):
    with pytest.raises(LoraPruneError, match="does not exist"):
        load_text(f"text:{tmp_path / 'missing.txt'}", "train")
    with pytest.raises(LoraPruneError, match="use one of: austen, pydoc, text:PATH"):
        load_text("shakespeare", "train")
    with pytest.raises(LoraPruneError, match="unknown split"):
        load_text("pydoc", "test")


def test_hub_corpus_without_datasets_library_names_the_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(LoraPruneError, match=r"pip install 'loraprune\[eval\]'"):
        load_text("wikitext2", "validation")
