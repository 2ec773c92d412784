"""`loraprune bench speed --runtime llamacpp` times GGUF files in llama.cpp next to ratios counted from the files."""

from __future__ import annotations

import json

import pytest

from loraprune.cli import main
from loraprune.evaluation.llamacpp_speed import file_stats, speed_table
from loraprune.export.gguf_writer import GGUF_NAME
from loraprune.pruning.masks import ModelMasks
from tests.export.test_gguf_writer import PER_LAYER, export, masks_keeping, tiny_llama

pytest.importorskip("xllamacpp")


def test_llamacpp_bench_writes_the_dense_gguf_and_compares_each_pruned_file(smollm2_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "tiny-smollm2"
    tiny_llama().save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    pruned = export(tiny_llama(), smollm2_tokenizer, masks_keeping(PER_LAYER), tmp_path / "pruned")

    code = main(["bench", "speed", "--runtime", "llamacpp", "--model", str(model_dir), "--pruned", str(pruned),
                 "--prompt-tokens", "32", "--new-tokens", "8", "--repeats", "1", "--threads", "1", "--json"])

    assert code == 0
    result = json.loads(capsys.readouterr().out)
    dense, row = result["models"]
    assert (dense["architecture"], row["architecture"]) == ("llama", "deci")
    assert dense["gguf_type"] == row["gguf_type"] == "f32"
    assert all(r["prefill_tokens_per_second_median"] > 0 and r["decode_tokens_per_second_median"] > 0
               for r in result["models"])
    comparison = result["comparisons"][0]
    assert comparison["pruned"] == "pruned"
    assert comparison["decode_ideal_bytes"] > 1 and comparison["prefill_ideal_flops"] > 1
    assert "| pruned |" in speed_table(result)


def test_file_stats_count_tied_embeddings_once_as_the_output_matrix(smollm2_tokenizer, tmp_path):
    model = tiny_llama()
    expected_linear = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2)  # embed = lm_head
    out = export(model, smollm2_tokenizer, ModelMasks.for_model(model), tmp_path / "dense")
    stats = file_stats(out / GGUF_NAME)
    assert stats["linear_flops_per_token"] == 2 * expected_linear
    norms = sum(p.numel() for name, p in tiny_llama().named_parameters() if p.ndim == 1)
    assert stats["weight_bytes"] == 4 * (expected_linear + norms)


def test_llamacpp_bench_on_a_missing_file_exits_2(tmp_path, capsys):
    code = main(["bench", "speed", "--runtime", "llamacpp", "--model", str(tmp_path / "dense.gguf"),
                 "--pruned", str(tmp_path / "missing")])
    assert code == 2
    assert "not a GGUF file" in capsys.readouterr().err
