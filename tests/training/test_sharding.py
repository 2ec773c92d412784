"""Sharded (FSDP2) pruning under torchrun, 2 CPU processes with gloo: the single-process result, at half the memory.

Two processes with one block each see the same global batch as one process with two blocks, so
masks must be equal and scores, adapter and exported weights equal up to float rounding (the
gradient sums are reduced in another order). LoRA dropout is off: its random draws depend on the
shape of each process's batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import save_tiny_run_inputs

TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = 8
# Measured: scores 3e-7, exported weights 1e-7, adapter 3e-5 (Adam divides by tiny second
# moments) of each tensor's largest entry; the limits leave room for another machine's rounding.
SCORE_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-5

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this Python")


def _prune_arguments(model_dir: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "loraprune", "prune", "--model", str(model_dir), "--data", f"text:{text}", "--out", str(out),
            "--sparsity", "0.3", "--steps", str(STEPS), "--prune-every", "2", "--seq-len", "32",
            "--eval-seq-len", "32", "--eval-tokens", "320", "--lr", "1e-3", "--lora-dropout", "0",
            "--criterion", "lora", "--save-every", "1", "--no-progress", *extra]


def _environment(home: Path) -> dict[str, str]:
    return {"PATH": str(TORCHRUN.parent), "OMP_NUM_THREADS": "1", "HOME": str(home),
            "PYTHONPATH": os.environ.get("PYTHONPATH", "")}


def _sharded_command(port: int, *arguments: str) -> list[str]:
    return [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={port}", *arguments, "--parallel", "fsdp",
            "--batch-size", "1"]


def _run(command: list[str], home: Path) -> str:
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=_environment(home))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_run_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> Path:
    """One process, two blocks per step."""
    out = tmp_path_factory.mktemp("single") / "out"
    _run([sys.executable, *_prune_arguments(*inputs, out), "--batch-size", "2"], out.parent)
    return out


@pytest.fixture(scope="module")
def sharded(inputs, tmp_path_factory) -> Path:
    """Two FSDP2 processes, one block each per step."""
    out = tmp_path_factory.mktemp("sharded") / "out"
    stdout = _run(_sharded_command(29641, *_prune_arguments(*inputs, out)), out.parent)
    assert stdout.count("pruned model written to") == 1
    return out


def _tensors(out: Path, name: str) -> dict[str, torch.Tensor]:
    path = out / name if name.endswith("model.safetensors") else out / "run" / "checkpoint" / name
    return load_file(str(path))


def _largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a − b| of any tensor, relative to that tensor's largest entry."""
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-30)).item()
               for k in a)


def _assert_same_pruned_masks(single: Path, sharded: Path) -> None:
    masks, single_masks = _tensors(sharded, "masks.safetensors"), _tensors(single, "masks.safetensors")
    assert masks.keys() == single_masks.keys()
    assert all(torch.equal(masks[k], single_masks[k]) for k in masks)
    assert any(not masks[k].bool().all() for k in masks)  # something was pruned


def test_two_fsdp_processes_give_the_single_process_masks_scores_and_weights(single, sharded):
    _assert_same_pruned_masks(single, sharded)
    assert _largest_relative_difference(_tensors(single, "scores.safetensors"),
                                        _tensors(sharded, "scores.safetensors")) < SCORE_TOLERANCE
    assert _largest_relative_difference(_tensors(single, "model.safetensors"),
                                        _tensors(sharded, "model.safetensors")) < WEIGHT_TOLERANCE
    state = json.loads((sharded / "run" / "checkpoint" / "state.json").read_text())
    assert state["samples_seen"] == STEPS * 2


def test_each_fsdp_process_holds_half_the_frozen_weights(single, sharded):
    processes = json.loads((sharded / "loraprune.json").read_text())["processes"]
    assert processes["count"] == 2 and processes["parallel"] == "fsdp"
    assert processes["frozen_weight_bytes"] == json.loads((single / "loraprune.json").read_text())[
        "processes"]["frozen_weight_bytes_per_process"]
    assert 0.49 < processes["frozen_weight_bytes_per_process"] / processes["frozen_weight_bytes"] <= 0.51


def _checkpointed_step(out: Path) -> int:
    try:
        return json.loads((out.with_name(out.name + ".partial") / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError):  # not written yet, or being swapped in
        return 0


def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_result(inputs, sharded, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(_sharded_command(29643, *_prune_arguments(*inputs, out)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=_environment(tmp_path))
    deadline = time.monotonic() + 600
    while _checkpointed_step(out) < 3:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # torchrun and both workers (each in a session of its own), as a crash would.
    for started in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        started.kill()
    process.communicate()
    assert not out.exists() and _checkpointed_step(out) < STEPS
    stdout = _run(_sharded_command(29645, *_prune_arguments(*inputs, out), "--resume"), tmp_path)
    assert "resumed from step" in stdout
    assert not out.with_name("out.partial").exists()
    masks, uninterrupted = _tensors(out, "masks.safetensors"), _tensors(sharded, "masks.safetensors")
    assert all(torch.equal(masks[k], uninterrupted[k]) for k in masks)
    assert _largest_relative_difference(_tensors(sharded, "model.safetensors"),
                                        _tensors(out, "model.safetensors")) < WEIGHT_TOLERANCE
    shutil.rmtree(out)


def test_fsdp_processes_scoring_a_calibration_text_give_the_single_process_masks(inputs, tmp_path):
    model_dir, text = inputs
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(" ".join(reversed(text.read_text().split())))  # same words, another order
    extra = ("--criterion", "fisher", "--calibration", f"text:{calibration}")  # the last --criterion counts
    single, sharded = tmp_path / "single" / "out", tmp_path / "sharded" / "out"
    _run([sys.executable, *_prune_arguments(model_dir, text, single, *extra), "--batch-size", "2"], tmp_path)
    _run(_sharded_command(29655, *_prune_arguments(model_dir, text, sharded, *extra)), tmp_path)
    _assert_same_pruned_masks(single, sharded)


def test_fsdp_kl_only_run_scores_its_teacher_sampled_loss(inputs, tmp_path):
    """--distill 1 scores a separate loss; FSDP2 keeps the sharded adapters out of its graph, so it must
    be differentiated by the hooked activations (each process samples its own teacher tokens: the masks
    are not the single process's)."""
    out = tmp_path / "out"
    stdout = _run(_sharded_command(29657, *_prune_arguments(*inputs, out, "--criterion", "fisher", "--distill", "1")),
                  tmp_path)
    assert "pruned model written to" in stdout
    assert any(not mask.bool().all() for mask in _tensors(out, "masks.safetensors").values())
