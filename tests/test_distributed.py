"""Data-parallel pruning under torchrun (gloo, 2 CPU processes): one consistent result."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from loraprune.data.generated import CALIBRATION_FILE, GeneratedText


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed beside this Python")
@pytest.mark.parametrize("calibrated", [False, True], ids=["scored-on-data", "scored-on-calibration"])
def test_two_process_run_shares_batches_and_exports_once(tiny_run_inputs, tmp_path, calibrated):
    model_dir, text = tiny_run_inputs
    out = tmp_path / "out"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    command = [torchrun, "--nproc_per_node=2", "--master_port=29533", "-m", "loraprune", "prune",
               "--model", str(model_dir), "--data", f"text:{text}", "--out", str(out), "--sparsity", "0.3",
               "--steps", "8", "--prune-every", "2", "--seq-len", "32", "--eval-seq-len", "32",
               "--eval-tokens", "640", "--lr", "1e-3", "--no-progress"]
    if calibrated:  # a separate scoring pass per step must not upset the data-parallel gradient sync
        command += ["--calibration", f"text:{text}+self"]  # self: sampled once, on the main process
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600,
                          env={"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1",
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "run" / "checkpoint" / "state.json").read_text())
    assert state["samples_seen"] == 8 * 2  # each optimizer step consumed one block per process
    report = json.loads((out / "loraprune.json").read_text())
    assert abs(report["achieved_sparsity"] - 0.3) < 0.02
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).num_parameters() > 0
    assert done.stdout.count("pruned model written to") == 1
    assert done.stdout.count("achieved whole-model sparsity") == 1
    if calibrated:
        scoring = GeneratedText.load(out / "run", CALIBRATION_FILE).train
        assert scoring.shape == (4 * 2, 32)  # a sample per process for each of the 4 steps before the cool-down
