"""The real SmolLM2 pruned to a llama.cpp-quantised GGUF through the CLI (short run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from loraprune.export.gguf_header import read_gguf
from loraprune.export.gguf_types import PROJECTIONS

pytest.importorskip("xllamacpp")
pytest.importorskip("llama_cpp")


def prune_command(austen_dir, out, gguf_type: str) -> list[str]:
    return [sys.executable, "-m", "loraprune", "prune", "--data", "austen", "--austen-dir", str(austen_dir),
            "--sparsity", "0.2", "--steps", "8", "--prune-every", "2", "--seq-len", "64", "--eval-tokens", "512",
            "--eval-seq-len", "256", "--format", "gguf", "--gguf-type", gguf_type, "--out", str(out),
            "--repetition-penalty", "1.1", "--no-progress"]  # given, not measured: kept through the quantizer


@pytest.mark.slow
def test_smollm2_prune_to_q4_k_m_writes_a_file_llamacpp_runs_with_fallback_only_where_the_model_forces_it(
        tmp_path, austen_dir, smollm2):
    from loraprune.export.llamacpp import LlamaCpp

    out = tmp_path / "q4_k_m"
    done = subprocess.run(prune_command(austen_dir, out, "q4_k_m"), check=False, capture_output=True, text=True,
                          timeout=2400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the hidden size (the rows of q/k/v/gate/up) is 576" in done.stderr  # said before training
    report = json.loads((out / "loraprune.json").read_text())
    assert report["config"]["round_to"] == 256  # what K-quant blocks need, not set by hand
    assert all(layer["ffn"] % 256 == 0 for layer in report["export"]["layers"])
    assert report["export"]["logit_check"]["passed"]  # llama.cpp's logits against the trained model's
    reader = read_gguf(out / "model.gguf")
    stored = {t.name: (int(t.shape[0]), t.tensor_type.name) for t in reader.tensors
              if t.name.split(".")[-2] in PROJECTIONS}
    assert len(stored) == 30 * 7
    assert reader.fields["general.sampling.penalty_repeat"].contents() == pytest.approx(1.1)
    # Rows of 256-multiples (the pruned FFN widths) are in Q4_K_M's own types; the model's 576-long rows
    # (q/k/v/gate/up, and o_proj at 3, 6 or 9 heads of 64) are in llama.cpp's fallback, nothing else.
    assert {kind for length, kind in stored.values() if length % 256 == 0} <= {"Q4_K", "Q5_K", "Q6_K"}
    assert {kind for length, kind in stored.values() if length % 256} <= {"Q5_0", "Q5_1", "Q8_0"}
    assert any(name.endswith("ffn_down.weight") and kind == "Q4_K" for name, (_, kind) in stored.items())
    fallbacks = sum(length % 256 != 0 for length, _ in stored.values())
    assert report["export"]["fallback_projections"] == fallbacks >= 30 * 5
    summary = re.search(r"written as a GGUF file \(q4_k_m, llama.cpp arch (\w+); projections: [^)]*\): "
                        r"([0-9.]+) MiB, ([0-9.]+)x the dense model's weights in f16 \([0-9.]+ MiB\); "
                        rf"{fallbacks} projections in llama.cpp's fallback type because", done.stdout)
    assert summary, done.stdout[-2000:]
    assert float(summary.group(3)) < 0.5  # ~5 bits a weight in the projections, 20 % fewer of them

    _, tokenizer = smollm2
    prompt = tokenizer("It is a truth universally acknowledged, that")["input_ids"]
    runtime = LlamaCpp(out / "model.gguf", context=256, threads=2)
    try:
        greedy = runtime.greedy(prompt, 16)
    finally:
        runtime.close()
    assert len(greedy.tokens) == 16 and len(set(greedy.tokens)) > 3
