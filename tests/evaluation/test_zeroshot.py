"""The lm-eval bridge runs a local multiple-choice task on a checkpoint folder.

Skipped when lm_eval (the `eval` extra) is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from loraprune.errors import LoraPruneError
from loraprune.evaluation.zeroshot import run_tasks

TASK_DIR = Path(__file__).parents[1] / "fixtures" / "lm_eval"


def tiny_checkpoint(folder: Path) -> Path:
    """A random two-layer Llama with a word-level tokenizer over the task's words."""
    words = sorted({w for line in (TASK_DIR / "loraprune_tiny_mc.jsonl").read_text().split()
                    for w in [line.strip('",:{}[]?')] if w})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=64, num_hidden_layers=2, vocab_size=len(vocab),
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_multiple_choice_task_reports_accuracy(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    model_dir = tiny_checkpoint(tmp_path / "tiny")
    monkeypatch.chdir(TASK_DIR)  # the task's data_files path is relative to it
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = run_tasks(model_dir, ["loraprune_tiny_mc"], include_path=TASK_DIR)
    accuracy = result["tasks"]["loraprune_tiny_mc"]["acc"]
    assert 0.0 <= accuracy <= 1.0
    assert result["samples"]["loraprune_tiny_mc"] == 4


def test_unknown_task_names_the_listing_command(tmp_path):
    pytest.importorskip("lm_eval")
    model_dir = tiny_checkpoint(tmp_path / "tiny")
    with pytest.raises(LoraPruneError, match="lm-eval ls tasks"):
        run_tasks(model_dir, ["no_such_task_xyz"], include_path=TASK_DIR)


def test_folder_without_config_is_refused(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(LoraPruneError, match="no config.json"):
        run_tasks(tmp_path, ["loraprune_tiny_mc"])


def test_missing_lm_eval_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(LoraPruneError, match=r"loraprune\[eval\]"):
        run_tasks(tmp_path, ["loraprune_tiny_mc"])


def test_eval_tasks_option_routes_to_lm_eval(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from loraprune.cli import main

    model_dir = tiny_checkpoint(tmp_path / "tiny")
    monkeypatch.chdir(TASK_DIR)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = main(["eval", "--model", str(model_dir), "--tasks", "loraprune_tiny_mc",
                 "--include-path", str(TASK_DIR)])
    assert code == 0
    assert capsys.readouterr().out.startswith("loraprune_tiny_mc: acc ")
