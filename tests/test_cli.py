"""Tests for the command line: user errors give exit code 2 and one line on stderr, no traceback.

Each case runs `python -m loraprune` in a subprocess, as a user would; none loads a real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loraprune import cli
from loraprune.errors import LoraPruneError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m loraprune ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "loraprune", *args], check=False, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit code 2, nothing on stdout, one 'loraprune: error:' line holding `fragment`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("loraprune: error:"), result.stderr
    assert fragment in lines[0]


def bad_files(tmp_path):
    """Paths of an empty, a binary and a non-UTF-8 file."""
    files = {"empty.txt": b"", "binary.txt": b"\x89PNG\x00\x00", "latin1.txt": b"caf\xe9"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "/no/such/model"], "does not exist"),
        (["--data", "shakespeare"], "unknown data 'shakespeare'"),
        (["--data", "text:/no/such/file.txt"], "does not exist"),
        (["--seq-len", "0"], "--seq-len must be a positive"),
        (["--max-tokens", "-1"], "--max-tokens must be a positive"),
        (["--batch-size", "0"], "--batch-size must be a positive"),
        (["--data", "text:{tmp}/empty.txt"], "is empty"),
        (["--data", "text:{tmp}/binary.txt"], "binary"),
        (["--data", "text:{tmp}/latin1.txt"], "not UTF-8"),
    ],
)
def test_eval_user_errors_exit_2_with_one_line(tmp_path, args, fragment):
    folder = bad_files(tmp_path)
    result = run_cli("eval", *(a.replace("{tmp}", str(folder)) for a in args))
    assert_one_line_error(result, fragment)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_exits_2(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    assert_one_line_error(run_cli("eval", "--data", f"text:{path}"), "cannot read")


def test_argparse_errors_exit_2():
    result = run_cli("eval", "--seq-len", "many")
    assert result.returncode == 2 and "invalid int value" in result.stderr
    assert run_cli("frobnicate").returncode == 2
    assert run_cli().returncode == 2


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "eval", ("", cli.add_eval_arguments, interrupted))
    assert cli.main(["eval"]) == 130
    assert capsys.readouterr().err.strip() == "loraprune: interrupted"


def test_library_errors_become_exit_2_in_process(monkeypatch, capsys):
    def failing(args):
        raise LoraPruneError("the fix is X")

    monkeypatch.setitem(cli.COMMANDS, "eval", ("", cli.add_eval_arguments, failing))
    assert cli.main(["eval"]) == 2
    assert capsys.readouterr().err == "loraprune: error: the fix is X\n"


def test_eval_json_reports_text_window_and_tokens(monkeypatch, capsys):
    from loraprune.evaluation import perplexity as evaluate

    seen = {}

    def fake_evaluate_model(**kwargs):
        seen.update(kwargs)
        return evaluate.PerplexityResult(10.0, 2.3, 30, 16, 2, 1.0, 32.0, kwargs["data"], kwargs["split"])

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate_model)
    assert cli.main(["eval", "--data", "pydoc", "--seq-len", "16", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"] == "pydoc" and printed["seq_len"] == 16 and printed["n_tokens"] == 30
    assert seen["model"] == "smollm2-135m" and seen["split"] == "validation"


@pytest.mark.slow
def test_eval_on_real_model_prints_perplexity_with_its_context():
    result = run_cli("eval", "--data", "pydoc", "--seq-len", "128", "--max-tokens", "512", "--no-progress")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("perplexity ") and "pydoc (validation)" in line
    assert "4 windows of 128 tokens" in line and "508 tokens predicted" in line


def test_prune_flags_reach_the_config(monkeypatch, tmp_path):
    from loraprune import job

    seen = {}

    def fake_prune(config, out, **options):
        seen["config"] = config
        raise KeyboardInterrupt  # stop before any work: only the parsed config matters here

    monkeypatch.setattr(job, "prune", fake_prune)
    code = cli.main(["prune", "--out", str(tmp_path / "o"), "--criterion", "flap", "--distill", "0.5",
                 "--distill-temperature", "2", "--distill-top-k", "50", "--bias-compensation", "--lora-rows-only"])
    assert code == 130
    config = seen["config"]
    assert (config.criterion, config.distill, config.distill_temperature, config.distill_top_k,
            config.bias_compensation, config.lora_columns) == ("flap", 0.5, 2.0, 50, True, False)
    for flag, penalty in (("auto", None), ("off", 1.0), ("1.15", 1.15)):
        assert cli.main(["prune", "--out", str(tmp_path / "o"), "--repetition-penalty", flag]) == 130
        assert seen["config"].repetition_penalty == penalty


LOST_RANK_SCRIPT = """
import argparse, os, sys
import torch
import torch.distributed as dist
from loraprune import cli

def all_reduce_after_rank_1_dies(args):
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        os._exit(9)  # as kill -9 would
    dist.all_reduce(torch.ones(1))
    dist.barrier()
    return 0

args = argparse.Namespace(handler=all_reduce_after_rank_1_dies, command="prune", resume=False, out=sys.argv[1])
sys.exit(cli._run(args))
"""


def test_a_rank_lost_under_torch_distributed_is_one_line_naming_the_resume_command(tmp_path):
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "lose_a_rank.py"
    script.write_text(LOST_RANK_SCRIPT)
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        processes.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    _, stderr = processes[0].communicate(timeout=300)
    processes[1].communicate(timeout=60)
    assert processes[0].returncode == cli.EXIT_PEER_LOST, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraprune: error: another process of this 2-process job died")
    assert lines[0].endswith(f"resume with: torchrun --nproc_per_node=2 -m loraprune prune --resume {tmp_path}/out.partial")


def test_lost_peer_errors_are_told_from_other_runtime_errors():
    from torch.distributed import DistBackendError

    assert cli.lost_another_process(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                                                 "Connection closed by peer [127.0.0.1]:29500"))
    assert cli.lost_another_process(DistBackendError("NCCL error"))
    assert not cli.lost_another_process(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
