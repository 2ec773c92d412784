"""Instruction and chat data: formats read, response-only labels, splits, refusals, and training on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loraprune.config import PruneConfig
from loraprune.data.blocks import corpus_blocks
from loraprune.data.corpora import load_corpus, load_text
from loraprune.data.records import IGNORE, InstructionData, labelled_ids
from loraprune.errors import LoraPruneError
from loraprune.evaluation.perplexity import perplexity
from loraprune.job import prune
from tests.conftest import build_tiny_model, build_word_tokenizer, save_tiny_run_inputs

FIXTURES = Path(__file__).parent.parent / "fixtures" / "instructions"
ALPACA, CHAT = FIXTURES / "alpaca.jsonl", FIXTURES / "chat.json"


def _records(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]


def test_alpaca_labels_keep_only_the_output_and_eos(smollm2_tokenizer):
    data = InstructionData(_records(ALPACA)[:1], "alpaca", "fixture")
    ids, labels = labelled_ids(smollm2_tokenizer, data)
    scored = labels != IGNORE
    assert (labels[scored] == ids[scored]).all()
    assert smollm2_tokenizer.decode(ids[scored]) == "Emma Woodhouse.<|im_end|>"
    prompt = smollm2_tokenizer.decode(ids[~scored])
    assert prompt.endswith("### Instruction:\nName the heroine of Emma.\n\n### Response:\n")
    assert scored.argmax() == (~scored).sum()  # the prompt comes first, all of it unscored


def test_chat_labels_keep_only_the_assistant_turns(smollm2_tokenizer):
    data = InstructionData(_records(CHAT)[1:2], "messages", "fixture")
    ids, labels = labelled_ids(smollm2_tokenizer, data)
    scored = labels != IGNORE
    whole = smollm2_tokenizer.apply_chat_template(_records(CHAT)[1]["messages"], tokenize=False)
    assert smollm2_tokenizer.decode(ids) == whole
    cuts = np.flatnonzero(np.diff(scored.astype(int))) + 1
    runs = [smollm2_tokenizer.decode(run) for run, flags in zip(np.split(ids, cuts), np.split(scored, cuts)) if flags[0]]
    assert runs == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    assert "Capital of France?" not in smollm2_tokenizer.decode(ids[scored])


@pytest.mark.parametrize("form", ["jsonl", "json", "parquet", "dataset"])
def test_every_format_reads_the_same_records_and_holds_out_the_last_tenth(form, tmp_path):
    records = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(20)]
    path = _write(records, form, tmp_path)
    train, validation = (load_corpus(f"text:{path}", split) for split in ("train", "validation"))
    assert [r["output"] for r in train.records] == [f"answer {i}" for i in range(18)]
    assert [r["output"] for r in validation.records] == ["answer 18", "answer 19"]


def _write(records: list[dict], form: str, folder: Path) -> Path:
    if form == "jsonl":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif form == "json":
        path = folder / "data.json"
        path.write_text(json.dumps(records))
    elif form == "parquet":
        import pyarrow as pa
        from pyarrow import parquet

        path = folder / "data.parquet"
        parquet.write_table(pa.Table.from_pylist(records), path)
    else:
        import datasets

        path = folder / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def test_split_files_and_dataset_splits_are_used_whole(tmp_path):
    shutil.copy(ALPACA, tmp_path / "train.jsonl")
    shutil.copy(CHAT, tmp_path / "validation.json")
    assert len(load_corpus(f"text:{tmp_path}", "train").records) == 4
    assert load_corpus(f"text:{tmp_path}", "validation").kind == "messages"
    import datasets

    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_records(ALPACA)),
                          "validation": datasets.Dataset.from_list(_records(ALPACA)[:1])}).save_to_disk(str(saved))
    assert len(load_corpus(f"text:{saved}", "train").records) == 4
    assert len(load_corpus(f"text:{saved}", "validation").records) == 1


def test_records_without_known_fields_are_refused_naming_found_and_expected(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(LoraPruneError, match=r"record 1 has fields answer, question; expected 'text', "
                                             r"'instruction' \+ 'output' \(and optional 'input'\), or 'messages'"):
        load_corpus(f"text:{path}", "train")


def test_messages_without_an_assistant_turn_or_a_chat_template_are_refused(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}]}] * 2))
    with pytest.raises(LoraPruneError, match="at least one assistant turn"):
        load_corpus(f"text:{path}", "train")
    data = InstructionData(_records(CHAT), "messages", "chat.json")
    with pytest.raises(LoraPruneError, match="no chat template; use a chat model or instruction/output records"):
        labelled_ids(build_word_tokenizer(["a"]), data)


def test_a_single_record_or_reading_records_as_text_is_refused(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(_records(ALPACA)[:1]))
    with pytest.raises(LoraPruneError, match="one record; give at least two, or a validation file"):
        load_corpus(f"text:{path}", "train")
    with pytest.raises(LoraPruneError, match="holds alpaca records, not plain text"):
        load_text(f"text:{ALPACA}", "train")


def test_perplexity_of_labelled_blocks_scores_only_the_responses():
    model = build_tiny_model("llama")
    ids = torch.arange(2, 26).view(1, 24)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 10:15] = ids[0, 10:15]
    result = perplexity(model, torch.stack([ids, labels], dim=1), progress=False)
    assert result.n_tokens == 5
    with torch.no_grad():
        logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 9:14], ids[0, 10:15])
    assert result.nll == pytest.approx(expected.item(), rel=1e-5)


def test_blocks_that_score_nothing_are_dropped(smollm2_tokenizer):
    data = InstructionData(_records(ALPACA), "alpaca", "fixture")
    blocks = corpus_blocks(smollm2_tokenizer, data, seq_len=16)
    assert blocks.shape[1:] == (2, 16)
    assert ((blocks[:, 1, 1:] != IGNORE).sum(dim=1) > 0).all()
    assert len(blocks) < labelled_ids(smollm2_tokenizer, data)[0].size // 16


@pytest.mark.parametrize("data", ["ALPACA", "ALPACA+self"])
def test_pruning_trains_on_instruction_records_and_validates_on_their_responses(data, tmp_path):
    model_dir, _ = save_tiny_run_inputs(tmp_path)
    records = [{"instruction": " ".join(f"w{(i * 7 + j) % 30}" for j in range(12)), "input": "",
                "output": " ".join(f"w{(i + j) % 30}" for j in range(20))} for i in range(60)]
    path = _write(records, "jsonl", tmp_path)
    config = PruneConfig(model=str(model_dir), data=data.replace("ALPACA", f"text:{path}"), sparsity=0.3, steps=4,
                         prune_every=2, seq_len=32, eval_seq_len=32, eval_tokens=640, save_every=2, lr=1e-3)
    result = prune(config, tmp_path / "out", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    dense = result.dense_perplexity
    # Validation is the last 6 records; only their outputs are scored, not the instructions.
    assert 0 < dense.n_tokens < dense.n_windows * (dense.seq_len - 1)
