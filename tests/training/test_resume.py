"""Crash safety of a pruning run: SIGKILL, Ctrl-C or a NaN loss, then resume, gives the same model.

Runs go through `python -m loraprune prune` in subprocesses, as a user's would, except the NaN case.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraprune.config import PruneConfig
from loraprune.errors import LoraPruneError
from loraprune.job import prune
from loraprune.training.losses import NextTokenCrossEntropy
from tests.conftest import gguf_tiny_prune_command, save_gguf_tiny_run_inputs, save_tiny_run_inputs, tiny_prune_command

STEPS = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny model folder and text file shared by the module."""
    return save_tiny_run_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory) -> Path:
    """The output folder of a run that was never stopped."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = subprocess.run(tiny_prune_command(*inputs, out), check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def _checkpointed_step(out: Path) -> int:
    try:
        return json.loads((out.with_name(out.name + ".partial") / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError):  # not written yet, or being swapped in
        return 0


def _sigint_reaches_python() -> None:
    # A shell that starts a job in the background (`cmd &`, nohup) makes it ignore SIGINT, and
    # Python then keeps ignoring it; CI may start the test runner that way.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_step(command: list[str], out: Path, step: int) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_sigint_reaches_python)  # noqa: PLW1509 (the test runs no threads)
    deadline = time.monotonic() + 600
    while _checkpointed_step(out) < step:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


def _resume(inputs, out: Path) -> None:
    result = subprocess.run(tiny_prune_command(*inputs, out, "--resume"), check=False, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "resumed from step" in result.stdout


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "run" / "log.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]


def _assert_same_result(out: Path, reference: Path) -> None:
    masks, reference_masks = (load_file(str(o / "run" / "checkpoint" / "masks.safetensors")) for o in (out, reference))
    assert masks.keys() == reference_masks.keys()
    assert all(torch.equal(masks[k], reference_masks[k]) for k in masks)
    kept = [json.loads((o / "loraprune.json").read_text())["kept_per_layer"] for o in (out, reference)]
    assert kept[0] == kept[1]
    assert _losses(out) == _losses(reference)
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (out, reference):
        with torch.no_grad():
            logits.append(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()(tokens).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def test_sigkill_then_resume_gives_the_uninterrupted_masks_and_logits(inputs, uninterrupted, tmp_path):
    out = tmp_path / "out"
    kill_at = random.Random(20261125).randint(2, STEPS - 3)
    process = _start_and_wait_for_step(tiny_prune_command(*inputs, out), out, kill_at)
    process.kill()
    process.communicate()
    assert not out.exists() and _checkpointed_step(out) < STEPS
    _resume(inputs, out)
    assert not out.with_name("out.partial").exists()
    _assert_same_result(out, uninterrupted)


def test_ctrl_c_exits_130_naming_resume_and_resuming_gives_the_same_masks(inputs, uninterrupted, tmp_path):
    out = tmp_path / "out"
    process = _start_and_wait_for_step(tiny_prune_command(*inputs, out), out, 3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("loraprune: error: interrupted after step") and "--resume" in lines[-1]
    assert "Traceback" not in stderr
    assert 3 <= _checkpointed_step(out) < STEPS and not out.exists()
    _resume(inputs, out)
    _assert_same_result(out, uninterrupted)


def test_the_printed_resume_command_alone_finishes_a_gguf_run_in_its_format_and_type(smollm2_tokenizer, tmp_path):
    pytest.importorskip("xllamacpp")
    model_dir, text = save_gguf_tiny_run_inputs(tmp_path, smollm2_tokenizer)
    out = tmp_path / "out"
    process = _start_and_wait_for_step(gguf_tiny_prune_command(model_dir, text, out, "--gguf-type", "q8_0"), out, 3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    printed = [line.split("Resume with: ")[1].split() for line in stderr.splitlines() if "Resume with: " in line]
    assert len(printed) == 1, stderr
    printed = printed[0]
    assert printed[:2] == ["loraprune", "prune"]
    resumed = subprocess.run([sys.executable, "-m", *printed], check=False, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["loraprune.json", "model.gguf", "run"]
    report = json.loads((out / "loraprune.json").read_text())
    assert report["export"]["gguf_type"] == "q8_0" and report["config"]["allocation"] == "global"


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(inputs, tmp_path, monkeypatch):
    model_dir, text = inputs
    bad_step, calls = 4, []
    real_loss = NextTokenCrossEntropy.__call__

    def loss_nan_at_bad_step(self, model, batch, teacher_logits=None, labels=None):
        calls.append(1)
        loss = real_loss(self, model, batch, teacher_logits, labels=labels)
        return loss * float("nan") if len(calls) == bad_step else loss

    monkeypatch.setattr(NextTokenCrossEntropy, "__call__", loss_nan_at_bad_step)
    config = PruneConfig(model=str(model_dir), data=f"text:{text}", sparsity=0.3, steps=STEPS, prune_every=2,
                         seq_len=32, eval_seq_len=32, eval_tokens=640, save_every=5, lr=1e-3)
    out = tmp_path / "out"
    with pytest.raises(LoraPruneError, match=f"at step {bad_step};.*--resume"):
        prune(config, out, progress=False)
    state = json.loads((tmp_path / "out.partial" / "checkpoint" / "state.json").read_text())
    assert state["step"] == bad_step - 1
    assert not out.exists()
