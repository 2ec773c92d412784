"""Bad input to `loraprune prune`: exit code 2, one line naming the fix, and no folder left behind.

Each case runs `python -m loraprune prune` in a subprocess, as a user would, on tiny saved models.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from loraprune.config import PruneConfig
from loraprune.job import prune
from tests.conftest import build_tiny_model, build_word_tokenizer, save_tiny_run_inputs, tiny_prune_command


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Good and bad models and texts, named by what is wrong with them."""
    folder = tmp_path_factory.mktemp("inputs")
    model, text = save_tiny_run_inputs(folder)
    words = build_word_tokenizer([f"w{i}" for i in range(100)])
    paths = {"model": model, "text": text, "missing": folder / "no-such-model", "not_a_model": folder / "notes",
             "gpt2": folder / "tiny-gpt2", "no_tokenizer": folder / "no-tokenizer",
             "other_model": folder / "other-llama", "empty": folder / "empty.txt",
             "binary": folder / "binary.txt", "short": folder / "short.txt"}
    paths["not_a_model"].mkdir()
    (paths["not_a_model"] / "readme.txt").write_text("not a model")
    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=128, bos_token_id=1, eos_token_id=1)
    GPT2LMHeadModel(gpt2).save_pretrained(paths["gpt2"])
    words.save_pretrained(paths["gpt2"])
    build_tiny_model("llama").save_pretrained(paths["no_tokenizer"])
    build_tiny_model("llama", seed=1).save_pretrained(paths["other_model"])
    words.save_pretrained(paths["other_model"])
    paths["empty"].write_bytes(b"")
    paths["binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    paths["short"].write_text("w1 w2 w3 w4 w5")
    return paths


@pytest.fixture(scope="module")
def interrupted_run(inputs, tmp_path_factory) -> Path:
    """The run folder (`out.partial`) of a short run that kept its checkpoint and did not export."""
    out = tmp_path_factory.mktemp("partial") / "out"
    config = PruneConfig(model=str(inputs["model"]), data=f"text:{inputs['text']}", sparsity=0.3, steps=4,
                         prune_every=2, seq_len=32, eval_seq_len=32, eval_tokens=640, lr=1e-3)
    prune(config, out, export=False, progress=False)
    return out.with_name("out.partial")


def run_prune(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m loraprune prune ARGS --no-progress` with output captured."""
    command = [sys.executable, "-m", "loraprune", "prune", *map(str, args), "--no-progress"]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, no traceback, and stderr is one 'loraprune: error:' line holding every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraprune: error:"), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def _tiny_args(inputs, out: Path, **flags: str) -> list[str]:
    args = {"--model": str(inputs["model"]), "--data": f"text:{inputs['text']}", "--out": str(out),
            "--sparsity": "0.3", "--steps": "12", "--prune-every": "2", "--seq-len": "32",
            "--eval-seq-len": "32", "--eval-tokens": "640"}
    args.update(flags)
    return [part for key, value in args.items() for part in ((key,) if value == "" else (key, value))]


BAD_NEW_RUNS = {
    "model_path_missing": ({"--model": "{missing}"}, ["does not exist", "check the path"]),
    "path_is_not_a_model": ({"--model": "{not_a_model}"}, ["no config.json", "--model"]),
    "architecture_not_supported": ({"--model": "{gpt2}"}, ["'gpt2' is not supported", "llama"]),
    "tokenizer_missing": ({"--model": "{no_tokenizer}"}, ["cannot load a tokenizer", "tokenizer.json"]),
    "sparsity_zero": ({"--sparsity": "0"}, ["--sparsity must be between 0 and 1"]),
    "sparsity_one": ({"--sparsity": "1"}, ["--sparsity must be between 0 and 1"]),
    "sparsity_beyond_layer_exclusions": ({"--skip-first": "3", "--sparsity": "0.9", "--no-export": ""},
                                         ["not reachable", "lower --sparsity"]),
    "global_allocation_with_attention_fraction": ({"--allocation": "global", "--attention-fraction": "0.2",
                                                   "--no-export": ""}, ["--attention-fraction"]),
    "steps_too_few_for_schedule": ({"--steps": "2", "--warmup": "0.4", "--cooldown": "0.4"},
                                   ["leaves no step for pruning", "--steps"]),
    "distill_weight_above_one": ({"--distill": "1.5"}, ["--distill must be a weight in [0, 1]"]),
    "distill_temperature_zero": ({"--distill": "0.5", "--distill-temperature": "0"},
                                 ["--distill-temperature must be positive"]),
    "distill_top_k_one": ({"--distill": "1", "--distill-top-k": "1"}, ["--distill-top-k must be at least 2"]),
    "repetition_penalty_above_two": ({"--repetition-penalty": "3"},
                                     ["--repetition-penalty must be auto, off or a number from 1 to 2"]),
    "unknown_data_name": ({"--data": "shakespeare"}, ["unknown data 'shakespeare'", "use one of"]),
    "text_empty": ({"--data": "text:{empty}"}, ["is empty"]),
    "text_binary": ({"--data": "text:{binary}"}, ["binary file", "UTF-8"]),
    "text_shorter_than_one_block": ({"--data": "text:{short}"}, ["fewer than one block", "--seq-len"]),
    "gguf_type_without_gguf_format": ({"--gguf-type": "q8_0"}, ["--gguf-type needs --format gguf"]),
    "gguf_type_with_another_format": ({"--gguf-type": "f16", "--format": "nemotron-nas"},
                                      ["--gguf-type needs --format gguf", "nemotron-nas"]),
}


@pytest.mark.parametrize("case", sorted(BAD_NEW_RUNS))
def test_bad_input_exits_2_with_one_line_and_creates_no_folder(inputs, tmp_path, case):
    flags, fragments = BAD_NEW_RUNS[case]
    flags = {key: value.format(**inputs) for key, value in flags.items()}
    result = run_prune(*_tiny_args(inputs, tmp_path / "out", **flags))
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def run_export(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m loraprune export ARGS` with output captured."""
    command = [sys.executable, "-m", "loraprune", "export", *map(str, args)]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)


def _unwritable_out(kind: str, tmp_path: Path) -> Path:
    if kind == "parent_is_a_file":
        (tmp_path / "afile").write_text("a file, not a folder")
        return tmp_path / "afile" / "sub" / "out"
    return Path({"proc": "/proc/loraprune-out", "sys": "/sys/loraprune-out"}[kind])


@pytest.mark.parametrize("kind", ["parent_is_a_file", "proc", "sys"])
def test_an_out_that_cannot_be_created_is_refused_before_the_model_loads(inputs, interrupted_run, tmp_path, kind):
    out = _unwritable_out(kind, tmp_path)
    before = sorted(tmp_path.iterdir())
    # A missing model would be the error if the model were loaded first.
    assert_one_line_error(run_prune(*_tiny_args(inputs, out, **{"--model": str(inputs["missing"])})),
                          f"cannot create {out}", "choose another --out")
    assert_one_line_error(run_export(interrupted_run, "--out", out), f"cannot create {out}", "choose another --out")
    assert sorted(tmp_path.iterdir()) == before


def test_existing_output_is_refused_and_left_untouched(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_prune(*_tiny_args(inputs, out)), "exists", "--overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_the_output_only_when_the_new_model_is_written(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    state = tmp_path / "out.partial" / "checkpoint" / "state.json"
    process = subprocess.Popen(tiny_prune_command(inputs["model"], inputs["text"], out, "--overwrite"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not state.is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.01)
    assert (out / "keep.txt").read_text() == "mine"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert (out / "keep.txt").read_text() == "mine"
    resumed = subprocess.run(tiny_prune_command(inputs["model"], inputs["text"], out, "--resume", "--overwrite"),
                             check=False, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copied_run(interrupted_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "out.partial"
    shutil.copytree(interrupted_run, run)
    return run


def test_corrupted_checkpoint_is_refused_on_resume(interrupted_run, tmp_path):
    run = _copied_run(interrupted_run, tmp_path)
    adapter = run / "checkpoint" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    before = _snapshot(run)
    assert_one_line_error(run_prune("--resume", run), "corrupted", "start again without --resume")
    assert _snapshot(run) == before and not (tmp_path / "out").exists()


def test_export_of_a_run_with_a_flipped_adapter_byte_is_refused_without_resume_advice(interrupted_run, tmp_path):
    run = _copied_run(interrupted_run, tmp_path)
    adapter = run / "checkpoint" / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0x01
    adapter.write_bytes(bytes(data))
    result = run_export(run, "--out", tmp_path / "exported")
    assert_one_line_error(result, "adapter.safetensors: its sha256 differs", "restore the run folder from a copy")
    assert "--resume" not in result.stderr and not (tmp_path / "exported").exists()


def _edit_recorded_config(run: Path, **changes) -> None:
    state_file = run / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"].update(changes)
    state_file.write_text(json.dumps(state))


def test_export_of_a_run_whose_base_model_is_gone_says_the_path_comes_from_the_checkpoint(inputs, interrupted_run,
                                                                                         tmp_path):
    run = _copied_run(interrupted_run, tmp_path)
    _edit_recorded_config(run, model=str(inputs["missing"]))
    assert_one_line_error(run_export(run, "--out", tmp_path / "exported"), "does not exist",
                          "recorded in the run's checkpoint", "put the model back")
    _edit_recorded_config(run, model=str(inputs["other_model"]))
    assert_one_line_error(run_export(run, "--out", tmp_path / "exported"), "made from another model",
                          "put the original model back")


def test_export_of_an_unfinished_run_says_so_on_the_console(interrupted_run, tmp_path):
    run = _copied_run(interrupted_run, tmp_path)
    _edit_recorded_config(run, steps=8)  # the run stopped at step 4 of 8
    result = run_export(run, "--out", tmp_path / "exported")
    assert result.returncode == 0, result.stderr
    assert "the run is unfinished: step 4 of 8" in result.stdout


def test_checkpoint_from_another_model_is_refused_on_resume(inputs, interrupted_run, tmp_path):
    run = _copied_run(interrupted_run, tmp_path)
    before = _snapshot(run)
    assert_one_line_error(run_prune("--resume", run, "--model", inputs["other_model"]), "changed settings (model)")
    assert _snapshot(run) == before and not (tmp_path / "out").exists()


def test_resume_with_a_changed_setting_names_it(interrupted_run, tmp_path):
    run = _copied_run(interrupted_run, tmp_path)
    before = _snapshot(run)
    assert_one_line_error(run_prune("--resume", run, "--sparsity", "0.4"), "changed settings (sparsity)")
    assert _snapshot(run) == before and not (tmp_path / "out").exists()
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["config"]["sparsity"] == 0.3
