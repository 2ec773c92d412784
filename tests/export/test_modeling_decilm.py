"""A per-layer DeciLM folder runs in plain transformers (trust_remote_code), without loraprune installed.

Everything the folder promises a transformers user is exercised in one subprocess whose Python
path does not contain loraprune: logits, cached greedy generation, save/load, bf16, PEFT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import LlamaConfig

from loraprune.export import ExportRequest, export_model
from loraprune.export.logit_check import compare_logits, logits_of
from loraprune.export.nemotron_nas_reader import load_decilm
from tests.export.test_nemotron_nas_writer import (
    PER_LAYER_FFN,
    PER_LAYER_HEADS,
    TINY,
    lora_model,
    masked_logits,
    per_layer_masks,
)

USER_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder, probe_file, resaved = sys.argv[1:4]
    probe, expected = torch.load(probe_file).values()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    result = {"loraprune_imported": any(name.startswith("loraprune") for name in sys.modules),
              "class": type(model).__name__, "attn_implementation": model.config._attn_implementation}
    with torch.inference_mode():
        logits = model(probe).logits
        result["logit_difference"] = float((logits - expected).norm() / expected.norm())
        prompt = probe[:1, :5]
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        result["generated_tokens"] = cached.shape[1] - prompt.shape[1]
        result["cached_equals_uncached"] = bool(torch.equal(cached, uncached))
        # Decoding step by step through the cache gives the full forward's last logits.
        step = model(prompt[:, :4], use_cache=True)
        cache = step.cache if hasattr(step, "cache") else step.past_key_values
        last = model(prompt[:, 4:5], cache=cache, use_cache=True).logits[0, -1]
        result["cached_step_difference"] = float((last - model(prompt).logits[0, -1]).abs().max())
    model.save_pretrained(resaved)
    reloaded = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        result["round_trip_equal"] = bool(torch.equal(reloaded(probe).logits, logits))
        bf16_logits = bf16(probe).logits
        result["bf16_dtype"] = str(bf16_logits.dtype)
        result["bf16_difference"] = float((bf16_logits.float() - expected).norm() / expected.norm())
    lora = LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    loss = peft_model(probe, labels=probe).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad]
    result["lora_parameters"] = len(grads)
    result["lora_parameters_with_gradient"] = sum(g is not None and bool(g.abs().sum() > 0) for g in grads)
    result["loss"] = float(loss)
    print(json.dumps(result))
""")


def run_as_transformers_user(folder, probe, expected, tmp_path) -> dict:
    """Run USER_SCRIPT on `folder` in a fresh interpreter that cannot import loraprune."""
    probe_file = tmp_path / "probe.pt"
    torch.save({"probe": probe, "expected": expected}, probe_file)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    done = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(folder), str(probe_file), str(tmp_path / "resaved")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_folder_ships_its_modeling_code_and_names_it_in_auto_map(written):
    folder, _, _ = written
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    assert "loraprune" not in (folder / "modeling_decilm.py").read_text().split('"""', 2)[2]
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, False, False, True]
    assert [b["ffn"].get("intermediate_size") for b in blocks] == [80, 37, None, 61, 12]


def test_export_check_model_equals_the_masked_lora_model(written):
    folder, expected, probe = written
    assert compare_logits(logits_of(load_decilm(folder), probe), expected).relative_difference < 1e-5


def test_transformers_user_gets_the_masked_model_cached_generation_round_trip_bf16_and_peft(written,
                                                                                          tmp_path):
    folder, expected, probe = written
    result = run_as_transformers_user(folder, probe, expected, tmp_path)
    assert not result["loraprune_imported"]
    assert result["class"] == "DeciLMForCausalLM"
    assert result["attn_implementation"] == "sdpa"
    assert result["logit_difference"] < 1e-5
    assert result["generated_tokens"] == 12 and result["cached_equals_uncached"]
    assert result["cached_step_difference"] < 1e-4
    assert result["round_trip_equal"]
    assert result["bf16_dtype"] == "torch.bfloat16" and result["bf16_difference"] < 0.05
    assert result["lora_parameters"] == 2 * (4 * 4 + 4 * 3)  # A and B: 4 attention blocks × 4, 4 FFN blocks × 3
    assert result["lora_parameters_with_gradient"] > 0 and result["loss"] > 0


def test_llama3_rope_scaling_is_carried_and_gives_the_masked_models_logits(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    model = lora_model(LlamaConfig(**TINY, rope_parameters=rope))
    masks = per_layer_masks(PER_LAYER_HEADS, PER_LAYER_FFN, TINY["intermediate_size"])
    probe = torch.randint(0, TINY["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(2))
    expected = masked_logits(model, masks, probe)
    folder = export_model(ExportRequest(model, masks, None, {}, tmp_path / "llama3", format="nemotron-nas"))
    assert json.loads((folder / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    decilm = load_decilm(folder)
    assert compare_logits(logits_of(decilm, probe), expected).relative_difference < 1e-5
    decilm.model.rotary_emb = type(decilm.model.rotary_emb)(LlamaConfig(**TINY, rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0}))  # unscaled RoPE: positions past 8 differ
    assert compare_logits(logits_of(decilm, probe), expected).relative_difference > 1e-3
