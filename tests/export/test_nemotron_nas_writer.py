"""The Nemotron-NAS (DeciLM) folder computes what the masked LoRA model computed, layer widths and all.

The folder is read back by an independent reference forward (config + safetensors only); vLLM
itself is exercised in test_nemotron_nas_vllm.py when it is installed.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from loraprune.errors import LoraPruneError
from loraprune.export import ExportRequest, export_model, nemotron_nas_folder
from loraprune.export.logit_check import LogitCheckFailed, compare_logits, logits_of, probe_ids
from loraprune.export.nemotron_nas_layout import PAD, plan_layout
from loraprune.export.nemotron_nas_reader import WEIGHTS_NAME, load_decilm
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask, ModelMasks

# 6 query heads in 3 KV groups of 2: enough room for uneven groups and zero padding.
TINY = {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16,
        "intermediate_size": 80, "num_hidden_layers": 5, "vocab_size": 128, "max_position_embeddings": 64,
        "tie_word_embeddings": False}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Per layer: kept query heads (6 of them, 2 per KV group) and kept FFN channels (of 80).
PER_LAYER_HEADS = [
    [1, 1, 1, 1, 1, 1],  # all kept
    [1, 0, 0, 0, 1, 1],  # KV group 1 gone, groups of 1 and 2 queries: needs zero slots
    [0, 0, 0, 1, 0, 0],  # one query head in one group
    [1, 1, 0, 0, 0, 0],  # one full group
    [0, 0, 0, 0, 0, 0],  # attention removed (no_op)
]
PER_LAYER_FFN = [80, 37, 0, 61, 12]  # layer 2: FFN removed (no_op)


def lora_model(config, seed: int = 0):
    """A seeded random model with non-zero LoRA B matrices, so merging changes the weights."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def per_layer_masks(heads: list[list[int]], ffn: list[int], intermediate: int, seed: int = 0) -> ModelMasks:
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for kept_heads, width in zip(heads, ffn):
        channels = torch.zeros(intermediate, dtype=torch.bool)
        channels[torch.randperm(intermediate, generator=generator)[:width]] = True
        layers.append(LayerMask(torch.tensor(kept_heads, dtype=torch.bool), channels))
    return ModelMasks(layers)


def masked_logits(model, masks: ModelMasks, ids: torch.Tensor) -> torch.Tensor:
    masks.attach(model, spec_for(model.config))
    try:
        return logits_of(model, ids)
    finally:
        masks.detach()


@pytest.fixture
def written(tmp_path):
    """(folder, masked model logits on a probe, probe) for the per-layer masks above."""
    model = lora_model(LlamaConfig(**TINY))
    masks = per_layer_masks(PER_LAYER_HEADS, PER_LAYER_FFN, TINY["intermediate_size"])
    probe = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    expected = masked_logits(model, masks, probe)
    out = export_model(ExportRequest(model, masks, None, {"source_model": "tiny"}, tmp_path / "nas",
                                     format="nemotron-nas"))
    return out, expected, probe


def test_written_folder_reproduces_the_masked_lora_model_with_per_layer_widths(written):
    folder, expected, probe = written
    comparison = compare_logits(logits_of(load_decilm(folder), probe), expected)
    assert comparison.relative_difference < 1e-5 and comparison.top1_agreement == 1.0
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    blocks = config["block_configs"]
    assert [b["ffn"].get("intermediate_size") for b in blocks] == [80, 37, None, 61, 12]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, True, False, False]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, False, False, True]
    # Layer 0 keeps all 6 heads, so 6 slots everywhere; the largest group that fits wins (fewest KV heads).
    assert config["num_attention_heads"] == 6
    assert [b["attention"].get("n_heads_in_group") for b in blocks] == [2, 3, 6, 6, None]


def test_report_counts_real_parameters_and_zero_padding_apart(written):
    folder, _, _ = written
    export = json.loads((folder / "loraprune.json").read_text())["export"]
    tensors = load_file(str(folder / WEIGHTS_NAME))
    assert export["parameters_stored"] == sum(t.numel() for t in tensors.values())
    assert export["parameters_after"] + export["zero_padding_parameters"] == export["parameters_stored"]
    assert export["logit_check"]["passed"] and export["format"] == "nemotron-nas"
    assert [layer["ffn"] for layer in export["layers"]] == PER_LAYER_FFN


def test_padded_slots_are_zero_and_only_zero_o_columns_are_needed(written):
    """Zero o_proj columns make a slot's output vanish whatever its q, k, v hold; zero q alone would not."""
    folder, expected, probe = written
    export = json.loads((folder / "loraprune.json").read_text())["export"]
    tensors = load_file(str(folder / WEIGHTS_NAME))
    head_dim, layer = 16, 1
    padded = [slot for slot, source in enumerate(export["layers"][layer]["query_slots"]) if source == PAD]
    assert padded, "layer 1 must have a zero-padded query slot"
    rows = torch.cat([torch.arange(s * head_dim, (s + 1) * head_dim) for s in padded])
    q_name, o_name = (f"model.layers.{layer}.self_attn.{p}.weight" for p in ("q_proj", "o_proj"))
    assert tensors[q_name][rows].abs().max() == 0 and tensors[o_name][:, rows].abs().max() == 0

    generator = torch.Generator().manual_seed(2)
    random_q = dict(tensors)
    random_q[q_name] = tensors[q_name].clone()
    random_q[q_name][rows] = torch.randn(len(rows), tensors[q_name].shape[1], generator=generator)
    save_file(random_q, str(folder / WEIGHTS_NAME))
    unchanged = compare_logits(logits_of(load_decilm(folder), probe), expected)
    assert unchanged.relative_difference < 1e-5

    random_o = dict(tensors)
    random_o[o_name] = tensors[o_name].clone()
    random_o[o_name][:, rows] = torch.randn(tensors[o_name].shape[0], len(rows), generator=generator)
    save_file(random_o, str(folder / WEIGHTS_NAME))
    # A zero query attends uniformly, so its output is the mean of V: non-zero through a non-zero o.
    changed = compare_logits(logits_of(load_decilm(folder), probe), expected)
    assert changed.relative_difference > 1e-2


def test_config_loads_through_autoconfig_with_remote_code_as_vllm_reads_it(written):
    folder, _, _ = written
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.model_type == "nemotron-nas" and config.head_dim == 16
    block = config.block_configs[1]
    assert block.attention.no_op is False and block.attention.n_heads_in_group == 3
    assert block.ffn.intermediate_size == 37 and not hasattr(block.ffn, "ffn_mult")
    assert config.block_configs[4].attention.no_op and config.to_dict()["block_configs"][2]["ffn"]["no_op"]


def test_layout_of_uniform_kv_group_pruning_needs_no_padding():
    shape = LayerShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=8)
    keep_groups_0_and_2 = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    masks = ModelMasks([LayerMask(keep_groups_0_and_2, torch.ones(8, dtype=torch.bool))] * 3)
    layouts = plan_layout(masks, shape)
    assert all(layout.query_sources == (0, 1, 2, 6, 7, 8) and layout.kv_sources == (0, 2) for layout in layouts)


def test_layout_pads_the_fewest_slots_for_uneven_layers():
    shape = LayerShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=8)
    ffn = torch.ones(8, dtype=torch.bool)
    one_head = torch.zeros(9, dtype=torch.bool)
    one_head[4] = True
    three_groups_of_one = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    layouts = plan_layout(ModelMasks([LayerMask(three_groups_of_one, ffn), LayerMask(one_head, ffn)]), shape)
    # 3 slots suffice: 3 KV heads of one query each, and the single head with 1 KV head + 2 zero slots.
    assert layouts[0].query_sources == (0, 3, 8) and layouts[0].kv_sources == (0, 1, 2)
    assert layouts[1].query_sources == (4, PAD, PAD) and layouts[1].kv_sources == (1,)


@pytest.mark.parametrize("config, message", [
    (Qwen2Config(**{**TINY, "hidden_size": 96}), "Llama-style"),
    (MistralConfig(**TINY, sliding_window=16), "sliding-window"),
    (LlamaConfig(**TINY, attention_bias=True), "biases"),
    (LlamaConfig(**TINY, hidden_act="gelu"), "SiLU"),
])
def test_models_the_format_cannot_express_are_refused_before_writing(config, message, tmp_path):
    model = lora_model(config)
    masks = per_layer_masks(PER_LAYER_HEADS, PER_LAYER_FFN, TINY["intermediate_size"])
    with pytest.raises(LoraPruneError, match=message):
        export_model(ExportRequest(model, masks, None, {}, tmp_path / "nas", format="nemotron-nas"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("heads, ffn, message", [
    ([[0] * 6] + PER_LAYER_HEADS[1:], PER_LAYER_FFN, "layer 0, the first layer"),
    ([[0] * 6, [0] * 6] + PER_LAYER_HEADS[2:], [0] + PER_LAYER_FFN[1:], "layer 1, the first layer"),
])
def test_an_ffn_before_the_first_attention_is_refused(heads, ffn, message, tmp_path):
    """vLLM's DeciLM has no residual stream yet there; a whole no-op layer first is fine (below)."""
    model = lora_model(LlamaConfig(**TINY))
    masks = per_layer_masks(heads, ffn, TINY["intermediate_size"])
    with pytest.raises(LoraPruneError, match=message):
        export_model(ExportRequest(model, masks, None, {}, tmp_path / "nas", format="nemotron-nas"))
    assert list(tmp_path.iterdir()) == []


def test_masks_removing_all_attention_are_refused(tmp_path):
    model = lora_model(LlamaConfig(**TINY))
    masks = per_layer_masks([[0] * 6] * 5, PER_LAYER_FFN, TINY["intermediate_size"])
    with pytest.raises(LoraPruneError, match="every attention head"):
        export_model(ExportRequest(model, masks, None, {}, tmp_path / "nas", format="nemotron-nas"))


def test_existing_out_dir_needs_overwrite(tmp_path):
    out = tmp_path / "nas"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    model = lora_model(LlamaConfig(**TINY))
    masks = per_layer_masks(PER_LAYER_HEADS, PER_LAYER_FFN, TINY["intermediate_size"])
    with pytest.raises(LoraPruneError, match="--overwrite"):
        export_model(ExportRequest(model, masks, None, {}, out, format="nemotron-nas"))
    export_model(ExportRequest(model, masks, None, {}, out, format="nemotron-nas", overwrite=True))
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


def test_a_wrong_head_placement_fails_the_logit_check_and_writes_nothing(tmp_path, monkeypatch):
    real = nemotron_nas_folder.padded_state_dict

    def swapped_kv_heads(model, layouts, spec):
        tensors = real(model, layouts, spec)
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = torch.cat([tensors[name][16:32], tensors[name][:16], tensors[name][32:]])
        return tensors

    monkeypatch.setattr(nemotron_nas_folder, "padded_state_dict", swapped_kv_heads)
    model = lora_model(LlamaConfig(**TINY))
    masks = per_layer_masks(PER_LAYER_HEADS, PER_LAYER_FFN, TINY["intermediate_size"])
    with pytest.raises(LogitCheckFailed, match="nothing was written"):
        export_model(ExportRequest(model, masks, None, {}, tmp_path / "nas", format="nemotron-nas",
                                   probe=probe_ids(TINY["vocab_size"])))
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_tensors_that_do_not_match_the_block_configs(written):
    folder, _, _ = written
    config = json.loads((folder / "config.json").read_text())
    config["block_configs"][1]["ffn"]["intermediate_size"] = 38
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoraPruneError, match="do not match its block_configs"):
        load_decilm(folder)


def test_uniform_masks_give_the_transformers_export_without_padding(tmp_path):
    """Same masks in both formats: same real parameter count, same logits, no zero slots."""
    uniform_heads = [[1, 1, 0, 0, 1, 1]] * 5
    masks = per_layer_masks(uniform_heads, [48] * 5, TINY["intermediate_size"])
    probe = probe_ids(TINY["vocab_size"])
    nas = export_model(ExportRequest(lora_model(LlamaConfig(**TINY)), masks, None, {}, tmp_path / "nas",
                                     format="nemotron-nas"))
    hf = export_model(ExportRequest(lora_model(LlamaConfig(**TINY)), masks, None, {}, tmp_path / "hf"))
    nas_export = json.loads((nas / "loraprune.json").read_text())["export"]
    hf_export = json.loads((hf / "loraprune.json").read_text())["export"]
    assert nas_export["zero_padding_parameters"] == 0
    assert nas_export["parameters_after"] == hf_export["parameters_after"]
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    comparison = compare_logits(logits_of(load_decilm(nas), probe), logits_of(hf_model, probe))
    assert comparison.relative_difference < 1e-5


def test_bfloat16_model_is_written_in_bfloat16_and_passes_its_check(tmp_path):
    model = lora_model(LlamaConfig(**TINY)).to(torch.bfloat16)
    masks = per_layer_masks(PER_LAYER_HEADS, PER_LAYER_FFN, TINY["intermediate_size"])
    out = export_model(ExportRequest(model, masks, None, {}, tmp_path / "nas", format="nemotron-nas"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(out / WEIGHTS_NAME)).values()} == {torch.bfloat16}


def test_a_wholly_removed_first_layer_is_written_as_two_no_op_blocks(tmp_path):
    model = lora_model(LlamaConfig(**TINY))
    masks = per_layer_masks([[0] * 6] + PER_LAYER_HEADS[1:], [0] + PER_LAYER_FFN[1:], TINY["intermediate_size"])
    probe = probe_ids(TINY["vocab_size"])
    expected = masked_logits(model, masks, probe)
    out = export_model(ExportRequest(model, masks, None, {}, tmp_path / "nas", format="nemotron-nas"))
    first = json.loads((out / "config.json").read_text())["block_configs"][0]
    assert first["attention"]["no_op"] and first["ffn"]["no_op"]
    assert compare_logits(logits_of(load_decilm(out), probe), expected).relative_difference < 1e-5


def test_prune_by_default_writes_a_global_deci_lm_folder_and_uniform_a_plain_llama(tiny_run_inputs, tmp_path,
                                                                                  capsys):
    from loraprune.cli import main
    from loraprune.config import PruneConfig
    from loraprune.job import export_run, prune

    model_dir, text = tiny_run_inputs
    config = PruneConfig(model=str(model_dir), data=f"text:{text}", sparsity=0.3, steps=8,
                         prune_every=2, seq_len=32, eval_seq_len=32, eval_tokens=256, save_every=8)
    out = tmp_path / "out"
    prune(config, out, progress=False)  # --format transformers, --allocation auto

    written = json.loads((out / "config.json").read_text())
    report = json.loads((out / "loraprune.json").read_text())
    assert report["config"]["allocation"] == "global"
    assert written["architectures"] == ["DeciLMForCausalLM"] and report["export"]["logit_check"]["passed"]
    assert len({(k["heads"], k["ffn"]) for k in report["kept_per_layer"]}) > 1  # layers kept their own widths
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    assert main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    assert "DeciLM folder" in capsys.readouterr().out
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]

    # Every reader of an exported folder takes this kind too.
    from loraprune.evaluation.speed import benchmark_speed
    from loraprune.info import checkpoint_info, format_info

    info = checkpoint_info(out)
    assert [(w["kv_heads"], w["intermediate_size"]) for w in info["layers"]] == [
        (written["num_attention_heads"] // b["attention"]["n_heads_in_group"], b["ffn"]["intermediate_size"])
        for b in written["block_configs"]]
    assert "DeciLMForCausalLM" in format_info(info)
    after = report["perplexity_after"]
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", f"text:{text}", "--seq-len", str(after["seq_len"]),
                 "--max-tokens", "256", "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)  # only the JSON: no remote-code prompt
    assert evaluated["ppl"] == pytest.approx(after["ppl"], rel=1e-4)
    speed = benchmark_speed(model_dir, [out], prompt_tokens=8, new_tokens=4, repeats=1)
    assert len(speed["models"]) == 2

    uniform = tmp_path / "uniform"
    prune(config.with_overrides({"allocation": "uniform"}), uniform, progress=False)
    assert json.loads((uniform / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not (uniform / "modeling_decilm.py").exists()
    assert export_run(out, tmp_path / "nas", export_format="nemotron-nas").is_dir()
