"""The real SmolLM2: a short prune-while-fine-tuning run through the CLI, end to end."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM


@pytest.mark.slow
def test_smollm2_prunes_to_the_whole_model_target_exports_and_reports_out_of_domain(tmp_path, austen_dir, smollm2):
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
    assert math.isfinite(report["perplexity_after"]["ppl"])
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.num_attention_heads == 6 and pruned.config.num_key_value_heads == 2
    assert pruned.num_parameters() == round(134_515_008 * (1 - report["achieved_sparsity"]))
    ood = report["out_of_domain"]["after"]
    assert ood["perplexity"]["data"] == "pydoc" and ood["perplexity"]["n_tokens"] == 4 * 255  # Austen-trained
    assert f"pruned {ood['perplexity']['ppl']:.3f}" in done.stdout and "repeated 4-grams" in done.stdout
    assert ood["fidelity"]["kl"] > 0.01 and 0.3 < ood["fidelity"]["top1_agreement"] < 1
    dense_health, pruned_health = report["out_of_domain"]["before"]["generation"], ood["generation"]
    assert len(pruned_health["samples"]) == len(dense_health["samples"]) >= 20
    assert 0 <= dense_health["repetition"] < 0.3  # the dense model does not loop on its own prompts
