"""Export writes a standard checkpoint that computes what the masked LoRA model computed.

Each case reloads the checkpoint in a fresh Python process that never imports loraprune.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from loraprune.errors import LoraPruneError
from loraprune.export import ExportRequest, export_model
from loraprune.export import transformers_writer as export_module
from loraprune.export import writer as writer_module
from loraprune.export.logit_check import LogitCheckFailed, compare_logits
from loraprune.export.slicing import merge_lora, slice_model
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask, ModelMasks

TINY = {"hidden_size": 64, "head_dim": 16, "intermediate_size": 96, "num_hidden_layers": 3,
        "vocab_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Runs in a clean interpreter: only torch + transformers, as a user of the checkpoint would.
RELOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
folder, ids_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.inference_mode():
    logits = model(input_ids=torch.load(ids_path)).logits
torch.save({"logits": logits, "architecture": type(model).__name__,
            "imported_loraprune": "loraprune" in sys.modules}, out_path)
"""


def tiny_model(config, seed: int = 0):
    """A seeded random model with non-zero LoRA B matrices, so merging changes the weights."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def uniform_masks(shape: LayerShape, num_layers: int, kv_groups: int, queries_per_group: int,
                  ffn: int, seed: int = 0) -> ModelMasks:
    """Random masks keeping the same counts in every layer (different units per layer)."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        heads = torch.zeros(shape.num_kv_heads, shape.queries_per_kv, dtype=torch.bool)
        for group in torch.randperm(shape.num_kv_heads, generator=generator)[:kv_groups]:
            heads[group, torch.randperm(shape.queries_per_kv, generator=generator)[:queries_per_group]] = True
        channels = torch.zeros(shape.intermediate_size, dtype=torch.bool)
        channels[torch.randperm(shape.intermediate_size, generator=generator)[:ffn]] = True
        layers.append(LayerMask(heads.flatten(), channels))
    return ModelMasks(layers)


def masked_logits(model, masks, spec, input_ids):
    masks.attach(model, spec)
    with torch.inference_mode():
        logits = model(input_ids=input_ids).logits
    masks.detach()
    return logits


def reload_in_fresh_process(folder: Path, input_ids: torch.Tensor, tmp_path: Path) -> dict:
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "reloaded.pt"
    torch.save(input_ids, ids_path)
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(folder), str(ids_path), str(out_path)],
                   check=True, capture_output=True, text=True)
    return torch.load(out_path)


CASES = {
    # name: (config, kept kv groups, kept queries per group, kept ffn, architecture written)
    "llama_mha_half_heads": (
        LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **TINY), 2, 1, 48,
        "LlamaForCausalLM"),
    "llama_gqa_drop_kv_groups": (
        LlamaConfig(num_attention_heads=8, num_key_value_heads=4, **TINY), 2, 2, 60,
        "LlamaForCausalLM"),
    "llama_gqa_heads_not_dividing_hidden_becomes_mistral": (
        LlamaConfig(num_attention_heads=8, num_key_value_heads=2, **TINY), 2, 3, 70,
        "MistralForCausalLM"),
    "llama_with_biases": (
        LlamaConfig(num_attention_heads=8, num_key_value_heads=4, attention_bias=True,
                    mlp_bias=True, **TINY), 2, 2, 50, "LlamaForCausalLM"),
    "mistral_single_query_heads": (
        MistralConfig(num_attention_heads=8, num_key_value_heads=2, sliding_window=None, **TINY),
        2, 3, 40, "MistralForCausalLM"),
    "qwen2_biases_drop_kv_group": (
        Qwen2Config(num_attention_heads=8, num_key_value_heads=4, **TINY), 3, 2, 64,
        "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("case", CASES)
def test_exported_checkpoint_matches_masked_model_in_fresh_process(case, tmp_path):
    config, kv_groups, per_group, ffn, architecture = CASES[case]
    model = tiny_model(config)
    spec = spec_for(config)
    shape = LayerShape.from_config(config)
    masks = uniform_masks(shape, config.num_hidden_layers, kv_groups, per_group, ffn)
    input_ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = masked_logits(model, masks, spec, input_ids)

    out = export_model(ExportRequest(model, masks, None, {"model": case}, tmp_path / "pruned"))

    reloaded = reload_in_fresh_process(out, input_ids, tmp_path)
    assert not reloaded["imported_loraprune"]
    assert reloaded["architecture"] == architecture
    assert compare_logits(reloaded["logits"], expected).relative_difference < 1e-4
    written = json.loads((out / "config.json").read_text())
    assert written["num_attention_heads"] == kv_groups * per_group
    assert written["num_key_value_heads"] == kv_groups
    assert written["intermediate_size"] == ffn
    assert written["head_dim"] == 16
    report = json.loads((out / "loraprune.json").read_text())
    assert report["model"] == case
    assert report["export"]["architecture"] == architecture
    assert report["export"]["parameters_after"] < report["export"]["parameters_before"]
    check = report["export"]["logit_check"]
    assert check["passed"] and check["slicing"]["relative_difference"] <= check["tolerance"]
    assert check["tolerance"] == pytest.approx(10 * check["noise_floor"])
    assert check["noise_floor"] >= check["rounding_noise_floor"] > 0
    assert check["slicing"]["top1_agreement"] == 1.0
    assert (out / "README.md").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merge_matters_because_lora_b_is_non_zero():
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **TINY)
    model = tiny_model(config)
    base_q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    merged = merge_lora(model)
    assert not torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, base_q)


def test_sliced_model_in_memory_has_the_pruned_shapes():
    config = Qwen2Config(num_attention_heads=8, num_key_value_heads=4, **TINY)
    model = merge_lora(tiny_model(config))
    masks = uniform_masks(LayerShape.from_config(config), 3, kv_groups=3, queries_per_group=2, ffn=64)
    sliced = slice_model(model, masks, spec_for(config))
    attention = sliced.model.layers[1].self_attn
    assert attention.q_proj.weight.shape == (6 * 16, 64) and attention.q_proj.bias.shape == (96,)
    assert attention.k_proj.weight.shape == (3 * 16, 64) and attention.k_proj.bias.shape == (48,)
    assert attention.o_proj.weight.shape == (64, 96)
    assert attention.num_key_value_groups == 2
    assert sliced.model.layers[1].mlp.down_proj.weight.shape == (64, 64)


def test_layers_with_different_widths_are_refused():
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **TINY)
    shape = LayerShape.from_config(config)
    masks = uniform_masks(shape, 3, kv_groups=2, queries_per_group=1, ffn=48)
    masks.layers[2].ffn[:] = True
    with pytest.raises(LoraPruneError, match="same count per layer"):
        slice_model(merge_lora(tiny_model(config)), masks, spec_for(config))


def test_uneven_query_heads_per_kv_group_are_refused():
    config = LlamaConfig(num_attention_heads=8, num_key_value_heads=2, **TINY)
    masks = ModelMasks.full(LayerShape.from_config(config), 3)
    for layer in masks.layers:
        layer.heads[:3] = False  # group 0 keeps 1 query head, group 1 keeps 4
    with pytest.raises(LoraPruneError, match="same count per KV group"):
        slice_model(merge_lora(tiny_model(config)), masks, spec_for(config))


def test_llama_with_biases_and_heads_not_dividing_hidden_is_refused():
    config = LlamaConfig(num_attention_heads=8, num_key_value_heads=2, attention_bias=True, **TINY)
    masks = uniform_masks(LayerShape.from_config(config), 3, kv_groups=2, queries_per_group=3, ffn=48)
    with pytest.raises(LoraPruneError, match="divides the hidden size"):
        slice_model(merge_lora(tiny_model(config)), masks, spec_for(config))


def test_existing_out_dir_needs_overwrite(tmp_path):
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **TINY)
    shape = LayerShape.from_config(config)
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")
    masks = uniform_masks(shape, 3, kv_groups=2, queries_per_group=1, ffn=48)
    with pytest.raises(LoraPruneError, match="pass --overwrite"):
        export_model(ExportRequest(tiny_model(config), masks, None, {}, out))
    export_model(ExportRequest(tiny_model(config), masks, None, {}, out, overwrite=True))
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_failed_validation_keeps_the_old_folder_and_removes_the_temporary_one(tmp_path, monkeypatch):
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **TINY)
    shape = LayerShape.from_config(config)
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def broken(*args, **kwargs):
        raise LoraPruneError("validation failed")

    monkeypatch.setattr(export_module, "reload_checkpoint", broken)
    masks = uniform_masks(shape, 3, kv_groups=2, queries_per_group=1, ffn=48)
    with pytest.raises(LoraPruneError, match="validation failed"):
        export_model(ExportRequest(tiny_model(config), masks, None, {}, out, overwrite=True))
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


GENERATE_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = tokenizer("The capital of France is", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
assert "loraprune" not in sys.modules
print(text)
"""


@pytest.mark.slow
def test_smollm2_export_without_a_kv_group_matches_and_generates(tmp_path):
    from loraprune.models.loading import load_model

    model, tokenizer = load_model("smollm2-135m")  # our own copy: export merges it in place
    config = model.config
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=PROJECTIONS, init_lora_weights=False))
    with torch.no_grad():  # non-zero but small B, so merging matters and the model stays sane
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.01)
    model.eval()
    spec, shape = spec_for(config), LayerShape.from_config(config)
    masks = uniform_masks(shape, config.num_hidden_layers, kv_groups=2, queries_per_group=3, ffn=1024)
    input_ids = tokenizer("It is a truth universally acknowledged, that a single man",
                          return_tensors="pt")["input_ids"]
    expected = masked_logits(model, masks, spec, input_ids)

    out = export_model(ExportRequest(model, masks, tokenizer, {"model": "smollm2-135m"}, tmp_path / "p"))

    written = json.loads((out / "config.json").read_text())
    assert (written["num_attention_heads"], written["num_key_value_heads"]) == (6, 2)
    assert written["intermediate_size"] == 1024
    reloaded = reload_in_fresh_process(out, input_ids, tmp_path)
    assert not reloaded["imported_loraprune"]
    assert compare_logits(reloaded["logits"], expected).relative_difference < 1e-4
    generated = subprocess.run([sys.executable, "-c", GENERATE_SCRIPT, str(out)], check=True,
                               capture_output=True, text=True).stdout
    assert generated.strip()


@pytest.mark.parametrize("export_format", ["transformers", "nemotron-nas"])
def test_the_runs_repetition_penalty_is_the_folders_decoding_default_over_the_bases(export_format, tmp_path):
    for name, penalty, expected in (("chosen", 1.15, 1.15), ("none chosen", 1.0, 1.0), ("not measured", None, 1.3)):
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **TINY)  # export slices it in place
        masks = uniform_masks(LayerShape.from_config(config), 3, kv_groups=2, queries_per_group=1, ffn=48)
        model = tiny_model(config)
        model.generation_config.repetition_penalty = 1.3  # as some bases ship (Qwen2.5-Instruct: 1.05)
        out = export_model(ExportRequest(model, masks, None, {}, tmp_path / name, format=export_format,
                                         repetition_penalty=penalty))
        assert json.loads((out / "generation_config.json").read_text())["repetition_penalty"] == expected


def test_a_model_dequantized_from_gguf_saves_as_a_plain_checkpoint(tmp_path):
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **TINY)
    model = tiny_model(config)
    base = model.get_base_model()
    base.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    base.hf_quantizer, base.is_quantized = object(), True
    masks = uniform_masks(LayerShape.from_config(config), 3, kv_groups=2, queries_per_group=1, ffn=48)
    out = export_model(ExportRequest(model, masks, None, {}, tmp_path / "pruned"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def _slicing_with_two_ffn_channels_swapped(monkeypatch, layer: int = 2) -> None:
    """Plant a real slicing bug: after slicing, two kept FFN channels trade their down_proj columns."""
    real_slice = export_module.slice_model

    def buggy_slice(model, masks, spec):
        sliced = real_slice(model, masks, spec)
        down = sliced.model.layers[layer].mlp.down_proj.weight
        with torch.no_grad():
            down[:, [0, 1]] = down[:, [1, 0]].clone()
        return sliced

    monkeypatch.setattr(export_module, "slice_model", buggy_slice)


def _pruned_tiny():
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **TINY)
    masks = uniform_masks(LayerShape.from_config(config), 3, kv_groups=1, queries_per_group=2, ffn=48)
    return tiny_model(config), masks


def test_a_slicing_bug_fails_the_logit_check_and_writes_nothing(tmp_path, monkeypatch):
    _slicing_with_two_ffn_channels_swapped(monkeypatch)
    model, masks = _pruned_tiny()
    with pytest.raises(LogitCheckFailed, match="beyond rounding.*top-1 agreement"):
        export_model(ExportRequest(model, masks, None, {}, tmp_path / "pruned"))
    assert list(tmp_path.iterdir()) == []


def test_a_merge_that_loses_the_adapters_fails_the_check_against_the_trained_model(tmp_path, monkeypatch):
    # The check once took the merge's own drift as its noise floor, so no merge error could fail it.
    monkeypatch.setattr(writer_module, "merge_lora", lambda model: model.unload())
    model, masks = _pruned_tiny()
    with pytest.raises(LogitCheckFailed, match="trained model"):
        export_model(ExportRequest(model, masks, None, {}, tmp_path / "pruned"))
    assert list(tmp_path.iterdir()) == []


def test_skipping_the_logit_check_writes_the_model_and_records_the_difference(tmp_path, monkeypatch):
    _slicing_with_two_ffn_channels_swapped(monkeypatch)
    model, masks = _pruned_tiny()
    out = export_model(ExportRequest(model, masks, None, {}, tmp_path / "pruned", check_logits=False))
    check = json.loads((out / "loraprune.json").read_text())["export"]["logit_check"]
    assert not check["passed"]
    assert check["slicing"]["relative_difference"] > 100 * check["tolerance"]


def test_rounding_noise_floor_follows_the_dtype_precision():
    from loraprune.export.logit_check import probe_ids, rounding_noise_floor

    model, _ = _pruned_tiny()
    merged = merge_lora(model)
    ids = probe_ids(merged.config.vocab_size)
    float32_floor = rounding_noise_floor(merged, ids)
    bfloat16_floor = rounding_noise_floor(merged.to(torch.bfloat16), ids)
    assert 0 < float32_floor < 1e-5
    assert bfloat16_floor > 1000 * float32_floor  # bfloat16 keeps 8 bits of mantissa, float32 24
