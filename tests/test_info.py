"""`checkpoint_info` describes any checkpoint folder from its config and safetensors headers.

Parameter counts must equal what transformers counts after loading.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from loraprune.errors import LoraPruneError
from loraprune.info import checkpoint_info, format_info


def test_info_counts_parameters_and_widths_like_transformers(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    (tmp_path / "loraprune.json").write_text(json.dumps(
        {"model": "tiny", "export": {"parameters_before": 200000, "parameters_after": 100000}}))
    info = checkpoint_info(tmp_path)
    assert info["parameters"] == model.num_parameters()
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["layers"] == [{"heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate_size": 96}] * 2
    assert info["loraprune"]["parameters"] == "200,000 -> 100,000"
    text = format_info(info)
    assert "0-1" in text and "LlamaForCausalLM" in text


def test_info_on_a_folder_without_config_names_the_fix(tmp_path):
    with pytest.raises(LoraPruneError, match="no config.json"):
        checkpoint_info(tmp_path / "missing")


def test_info_command_prints_widths_and_exits_2_on_a_bad_path(tmp_path, capsys):
    from loraprune.cli import main

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=96, num_hidden_layers=2, vocab_size=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_info_reads_each_layers_widths_from_a_deci_lm_folders_block_configs(tmp_path, capsys):
    from loraprune.cli import main
    from loraprune.export import ExportRequest, export_model
    from tests.export.test_nemotron_nas_writer import PER_LAYER_FFN, PER_LAYER_HEADS, TINY, lora_model, per_layer_masks

    model = lora_model(LlamaConfig(**TINY))
    masks = per_layer_masks(PER_LAYER_HEADS, PER_LAYER_FFN, TINY["intermediate_size"])
    folder = export_model(ExportRequest(model, masks, None, {}, tmp_path / "decilm", format="nemotron-nas"))
    info = checkpoint_info(folder)
    kv = [layer["kv_heads"] for layer in info["layers"]]
    assert [layer["intermediate_size"] for layer in info["layers"]] == [80, 37, 0, 61, 12]
    assert kv[0] == 3 and kv[4] == 0 and all(0 < k <= 3 for k in kv[1:4])  # layer 4: no attention
    assert main(["info", str(folder)]) == 0
    assert "DeciLMForCausalLM" in capsys.readouterr().out
