"""The real SmolLM2 pruned to a llama.cpp-quantised GGUF through the CLI (short run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from loraprune.export.gguf_types import projection_types

pytest.importorskip("xllamacpp")
pytest.importorskip("llama_cpp")


def prune_command(austen_dir, out, gguf_type: str) -> list[str]:
    return [sys.executable, "-m", "loraprune", "prune", "--data", "austen", "--austen-dir", str(austen_dir),
            "--sparsity", "0.2", "--steps", "8", "--prune-every", "2", "--seq-len", "64", "--eval-tokens", "512",
            "--eval-seq-len", "256", "--format", "gguf", "--gguf-type", gguf_type, "--out", str(out),
            "--no-progress"]


@pytest.mark.slow
def test_smollm2_q4_k_m_is_refused_before_training_its_hidden_size_is_no_multiple_of_256(tmp_path, austen_dir):
    out = tmp_path / "q4_k_m"
    done = subprocess.run(prune_command(austen_dir, out, "q4_k_m"), check=False, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("loraprune: error: --gguf-type q4_k_m stores rows in "
                                                           "blocks of 256, and this model's hidden size")
    assert "576" in done.stderr and "choose --gguf-type q4_0 or q8_0" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_prune_to_q4_0_writes_a_file_llamacpp_runs_with_every_projection_in_q4_0(
        tmp_path, austen_dir, smollm2):
    from loraprune.export.llamacpp import LlamaCpp

    out = tmp_path / "q4_0"
    done = subprocess.run(prune_command(austen_dir, out, "q4_0"), check=False, capture_output=True, text=True,
                          timeout=2400)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "loraprune.json").read_text())
    assert report["config"]["round_to"] == 32  # what Q4_0's blocks need, not set by hand
    assert all(layer["ffn"] % 32 == 0 for layer in report["export"]["layers"])
    assert report["export"]["logit_check"]["passed"]  # llama.cpp's logits against the trained model's
    types = projection_types(out / "model.gguf")
    assert len(types) == 30 * 7 and set(types.values()) == {"Q4_0"}
    summary = re.search(r"written as a GGUF file \(q4_0, llama.cpp arch (\w+); projections: 210 Q4_0\): "
                        r"([0-9.]+) MiB, ([0-9.]+)x the dense model's weights in f16", done.stdout)
    assert summary, done.stdout[-2000:]
    assert float(summary.group(3)) < 0.5  # ~4.5 bits a weight in the projections, 20 % fewer of them

    _, tokenizer = smollm2
    prompt = tokenizer("It is a truth universally acknowledged, that")["input_ids"]
    runtime = LlamaCpp(out / "model.gguf", context=256, threads=2)
    try:
        greedy = runtime.greedy(prompt, 16)
    finally:
        runtime.close()
    assert len(greedy.tokens) == 16 and len(set(greedy.tokens)) > 3
