"""`loraprune bench speed --runtime llamacpp` times GGUF files in llama.cpp next to ratios counted from the files."""

from __future__ import annotations

import json

import pytest

from loraprune.cli import main
from loraprune.evaluation.llamacpp_speed import speed_table
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
    # Tied embeddings count once, as the output matrix; norms are read but do no matmul.
    model = tiny_llama()
    linear = sum(p.numel() for p in model.parameters() if p.ndim == 2)
    norms = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    assert dense["linear_flops_per_token"] == 2 * linear and dense["weight_bytes"] == 4 * (linear + norms)
    removed = sum(96 * 16 * 2 * (6 - len(heads)) + 96 * 16 * 2 * (3 - len({h // 2 for h in heads}))
                  + 3 * 96 * (96 - ffn) for heads, ffn in PER_LAYER)
    assert row["linear_flops_per_token"] == 2 * (linear - removed)
    assert comparison["prefill_ideal_flops"] == pytest.approx(linear / (linear - removed))
    assert comparison["decode_ideal_bytes"] > 1
    assert "| pruned |" in speed_table(result)


def test_llamacpp_bench_on_a_missing_file_exits_2(tmp_path, capsys):
    code = main(["bench", "speed", "--runtime", "llamacpp", "--model", str(tmp_path / "dense.gguf"),
                 "--pruned", str(tmp_path / "missing")])
    assert code == 2
    assert "not a GGUF file" in capsys.readouterr().err
