"""The real SmolLM2: a short prune-while-fine-tuning run through the CLI, end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loraprune.data import load_text
from loraprune.evaluation.decoding import EXCESS_TOLERANCE
from loraprune.export.gguf_header import read_gguf

# Run by a transformers user: the folder's own modeling code, loraprune not importable.
USER_SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.inference_mode():
    top1 = model(ids).logits[0].argmax(-1).tolist()
print(json.dumps({"class": type(model).__name__, "parameters": model.num_parameters(), "top1": top1,
                  "loraprune_imported": any(m.startswith("loraprune") for m in sys.modules)}))
"""


@pytest.mark.slow
def test_smollm2_global_run_exports_a_deci_lm_folder_with_the_runs_perplexity_and_its_gguf_tokens(
        tmp_path, austen_dir, smollm2):
    out = tmp_path / "smollm2-0.2"
    command = [sys.executable, "-m", "loraprune", "prune", "--data", "austen", "--austen-dir", str(austen_dir),
               "--sparsity", "0.2", "--steps", "20", "--prune-every", "2", "--seq-len", "64",
               "--eval-tokens", "1024", "--eval-seq-len", "256", "--out", str(out), "--no-progress"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    achieved = float(re.search(r"achieved whole-model sparsity ([0-9.]+)", done.stdout).group(1))
    one_ffn_channel_in_every_layer = 30 * 3 * 576 / 134_515_008
    assert abs(achieved - 0.2) <= one_ffn_channel_in_every_layer
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 20 and all(math.isfinite(entry["loss"]) for entry in log)
    report = json.loads((out / "loraprune.json").read_text())
    assert report["config"]["allocation"] == "global" and math.isfinite(report["perplexity_after"]["ppl"])
    assert "trust_remote_code=True" in done.stdout  # the summary shows how to load it

    _, tokenizer = smollm2
    ids = tokenizer(load_text("austen", "validation", austen_dir)[:8000])["input_ids"][:256]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    user = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(out), json.dumps(ids)], check=False,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**env, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")})
    assert user.returncode == 0, user.stderr[-2000:]
    loaded = json.loads(user.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "DeciLMForCausalLM" and not loaded["loraprune_imported"]
    real = report["export"]["parameters_after"]
    assert abs(real - round(134_515_008 * (1 - report["achieved_sparsity"]))) <= 1

    after = report["perplexity_after"]
    evaluated = subprocess.run([sys.executable, "-m", "loraprune", "eval", "--model", str(out), "--data", "austen",
                                "--austen-dir", str(austen_dir), "--seq-len", str(after["seq_len"]),
                                "--max-tokens", "1024", "--json", "--no-progress"],  # the run's --eval-tokens
                               check=False, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["n_tokens"] == after["n_tokens"]
    assert f"{result['ppl']:.4g}" == f"{after['ppl']:.4g}"

    pytest.importorskip("xllamacpp")
    from loraprune.export.llamacpp import LlamaCpp

    gguf = tmp_path / "gguf"
    exported = subprocess.run([sys.executable, "-m", "loraprune", "export", str(out), "--out", str(gguf),
                               "--format", "gguf"], check=False, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    llamacpp = LlamaCpp(gguf / "model.gguf", context=512, embeddings=True)
    try:
        hidden = torch.from_numpy(np.asarray(llamacpp.hidden_states(ids)))
    finally:
        llamacpp.close()
    embedding = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]  # SmolLM2 ties lm_head
    gguf_top1 = (hidden @ embedding.T).argmax(-1).tolist()
    agreement = sum(a == b for a, b in zip(gguf_top1, loaded["top1"])) / len(ids)
    assert agreement >= 0.99
    ood = report["out_of_domain"]["after"]
    assert ood["perplexity"]["data"] == "pydoc" and ood["perplexity"]["n_tokens"] == 4 * 255  # Austen-trained
    assert f"pruned {ood['perplexity']['ppl']:.3f}" in done.stdout and "repeated 4-grams" in done.stdout
    assert ood["fidelity"]["kl"] > 0.01 and 0.3 < ood["fidelity"]["top1_agreement"] < 1
    dense_health, pruned_health = report["out_of_domain"]["before"]["generation"], ood["generation"]
    assert len(pruned_health["samples"]) == len(dense_health["samples"]) >= 20
    assert 0 <= dense_health["repetition"] < 0.3  # the dense model does not loop on its own prompts

    decoding, penalty = report["decoding"], report["decoding"]["repetition_penalty"]
    assert decoding["measured"] and decoding["n_prompts"] == len(decoding["dense_per_prompt"]) == 12
    assert list(decoding["excess"]) == list(decoding["tried"]) and float(list(decoding["tried"])[-1]) == penalty
    excess = list(decoding["excess"].values())
    assert all(over > EXCESS_TOLERANCE for over in excess[:-1])  # mildest first
    assert decoding["reached_bar"] == (excess[-1] <= EXCESS_TOLERANCE)
    assert json.loads((out / "generation_config.json").read_text()).get("repetition_penalty", 1.0) == penalty
    written = read_gguf(gguf / "model.gguf").fields.get("general.sampling.penalty_repeat")
    assert (written.contents() if written else 1.0) == pytest.approx(penalty)
    assert "decoding default:" in done.stdout
    if penalty != 1.0:  # judged on the health prompts, which it was not chosen on
        assert decoding["generation"]["repetition"] < pruned_health["repetition"]
