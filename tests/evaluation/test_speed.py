"""The speed benchmark counts FLOPs and bytes correctly and returns one comparison per pruned model.

Timings themselves are not asserted: they depend on the machine.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from loraprune.evaluation.speed import (
    attention_flops,
    benchmark_speed,
    decode_flops_per_token,
    linear_flops_per_token,
    prefill_flops,
    speed_table,
    weight_bytes,
)

TINY = {"hidden_size": 64, "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 128,
            "max_position_embeddings": 128, "tie_word_embeddings": True}


def tiny(heads: int, kv_heads: int, intermediate: int):
    torch.manual_seed(0)
    config = LlamaConfig(num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate, **TINY)
    return AutoModelForCausalLM.from_config(config).eval()


def test_flop_counts_follow_the_layer_shapes():
    model = tiny(4, 2, 96)
    per_layer = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96)
    assert linear_flops_per_token(model, include_lm_head=False) == 2 * per_layer
    assert linear_flops_per_token(model) == 2 * per_layer + 2 * 64 * 128
    assert attention_flops(model.config, query_tokens=1, context=10) == 4 * 4 * 16 * 10 * 2
    assert decode_flops_per_token(model, 10) == linear_flops_per_token(model) + 4 * 4 * 16 * 10 * 2
    # Causal prefill of 3 tokens: 3 linear passes, lm_head once, 1 + 2 + 3 attended positions.
    assert prefill_flops(model, 3) == 3 * 2 * per_layer + 2 * 64 * 128 + 4 * 4 * 16 * 6 * 2


def test_weight_bytes_count_a_tied_embedding_once():
    model = tiny(4, 2, 96)
    assert weight_bytes(model) == 4 * model.num_parameters()


def test_benchmark_compares_each_pruned_model_with_the_dense_one(tmp_path):
    tiny(4, 2, 96).save_pretrained(tmp_path / "dense")
    tiny(2, 1, 48).save_pretrained(tmp_path / "pruned")
    result = benchmark_speed(tmp_path / "dense", [tmp_path / "pruned"], prompt_tokens=16,
                             new_tokens=4, repeats=2, threads=1)
    assert [m["name"] for m in result["models"]] == ["dense", "pruned"]
    assert len(result["models"][0]["prefill_seconds"]) == 2
    comparison = result["comparisons"][0]
    assert comparison["pruned"] == "pruned"
    assert comparison["prefill_ideal_flops"] > 1 and comparison["decode_ideal_bytes"] > 1
    assert comparison["decode_bound_with_measured_floor"] > 0
    assert result["machine"]["torch_threads"] == 1
    assert "| pruned |" in speed_table(result)


def test_bench_speed_command_prints_the_table(tmp_path, capsys):
    from loraprune.cli import main

    tiny(4, 2, 96).save_pretrained(tmp_path / "dense")
    tiny(2, 1, 48).save_pretrained(tmp_path / "pruned")
    code = main(["bench", "speed", "--model", str(tmp_path / "dense"), "--pruned",
                 str(tmp_path / "pruned"), "--prompt-tokens", "8", "--new-tokens", "3",
                 "--repeats", "1", "--threads", "1"])
    assert code == 0
    assert "| pruned |" in capsys.readouterr().out


def test_bench_speed_on_a_missing_folder_exits_2(tmp_path, capsys):
    from loraprune.cli import main

    tiny(4, 2, 96).save_pretrained(tmp_path / "dense")
    code = main(["bench", "speed", "--model", str(tmp_path / "dense"), "--pruned", str(tmp_path / "x")])
    assert code == 2
    assert "no config.json" in capsys.readouterr().err
