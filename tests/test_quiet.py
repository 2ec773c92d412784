"""A default `loraprune prune` and `loraprune export` show the user no other library's warnings.

Both run as a user would, in subprocesses, on a tiny saved model; stderr is read line by line.
"""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import save_tiny_run_inputs

# What another library's message looks like: a warning category, warnings.warn's echo, or a library's name.
FOREIGN = re.compile(r"Warning|warnings\.warn|bitsandbytes|kernels|transformers|peft|accelerate|torch",
                     re.IGNORECASE)


def _foreign_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if FOREIGN.search(line)]


def test_prune_and_export_print_no_warning_from_another_library(tmp_path):
    model_dir, text = save_tiny_run_inputs(tmp_path)
    out = tmp_path / "out"
    prune = subprocess.run([sys.executable, "-m", "loraprune", "prune", "--model", str(model_dir), "--data",
                            f"text:{text}", "--out", str(out), "--sparsity", "0.3", "--steps", "4", "--prune-every",
                            "2", "--seq-len", "32", "--eval-seq-len", "32", "--eval-tokens", "256", "--no-progress"],
                           check=False, capture_output=True, text=True, timeout=900)
    assert prune.returncode == 0, prune.stderr
    assert prune.stderr == ""  # --no-progress: not even another library's progress bar
    export = subprocess.run([sys.executable, "-m", "loraprune", "export", str(out), "--out", str(tmp_path / "again")],
                            check=False, capture_output=True, text=True, timeout=900)
    assert export.returncode == 0, export.stderr
    assert _foreign_lines(export.stderr) == []


def test_eval_no_progress_on_a_gguf_shows_no_progress_bar(uniform_gguf_file, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man must be in want of a wife.\n" * 40)
    result = subprocess.run([sys.executable, "-m", "loraprune", "eval", "--model", str(uniform_gguf_file), "--data",
                             f"text:{text}", "--seq-len", "64", "--max-tokens", "256", "--no-progress"],
                            check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout
    assert result.stderr == ""  # neither the GGUF conversion's nor the weight loading's bars


def test_the_decode_profile_of_bench_speed_hides_torchs_profiler_lines_and_keeps_others(capfd):
    import os

    import torch

    from loraprune.evaluation.speed import decode_profile
    from loraprune.quiet import filtered_stderr
    from tests.conftest import build_tiny_model

    shares = decode_profile(build_tiny_model("llama").eval(), torch.arange(8)[None], steps=2)
    assert shares["matmul"] > 0
    with filtered_stderr():
        os.write(2, b"USDT:2026 SyncActivityProfilerHandler.cpp:52] profiler_start\nan error the user must see\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "an error the user must see" in err
