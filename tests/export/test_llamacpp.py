"""llama.cpp runs in a child process: Ctrl-C during any call exits at once and leaves nothing behind.

In process, a Ctrl-C during a completion left xllamacpp's server destructor joining its thread for ever.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraprune.errors import LoraPruneError
from tests.conftest import gguf_tiny_prune_command, save_gguf_tiny_run_inputs

pytest.importorskip("xllamacpp")

SERVER_MARK = "from loraprune.export.llamacpp import serve"


def _sigint_reaches_python() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have made the test runner ignore it


def _servers_of(pid: int) -> list[int]:
    """Process ids of llama.cpp servers started by ``pid``."""
    servers = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and SERVER_MARK in command:
            servers.append(int(entry.name))
    return servers


def _interrupt_once_llamacpp_runs(command: list[str], settle: float, ready_line: str | None = None,
                                  ) -> tuple[subprocess.Popen, float, list[int]]:
    """Start ``command`` and send it Ctrl-C ``settle`` s after it prints ``ready_line`` or, without one,
    after its llama.cpp server appears; returns (process, seconds it took to exit, servers seen)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_sigint_reaches_python)  # noqa: PLW1509 (the test runs no threads)
    if ready_line is not None:
        assert process.stdout.readline().strip() == ready_line, process.communicate()
        servers = _servers_of(process.pid)
    deadline = time.monotonic() + 600
    while ready_line is None and not (servers := _servers_of(process.pid)):
        assert process.poll() is None, f"finished without starting llama.cpp in a child: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(settle)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        process.stderr_text = process.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("still running 30 s after Ctrl-C")
    return process, time.monotonic() - sent, servers


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_ctrl_c_during_a_completion_exits_at_once_and_kills_llamacpp(uniform_gguf_file, tmp_path):
    script = tmp_path / "complete_forever.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from loraprune.export.llamacpp import LlamaCpp
        runtime = LlamaCpp({str(uniform_gguf_file)!r})
        print("ready", flush=True)
        try:
            while True:
                runtime.greedy(list(range(1, 100)), 200)
        except KeyboardInterrupt:
            runtime.close()
            sys.exit(130)
    """))
    process, seconds, servers = _interrupt_once_llamacpp_runs([sys.executable, str(script)], settle=1,
                                                              ready_line="ready")
    assert process.returncode == 130 and seconds < 5
    assert not any(_alive(pid) for pid in servers)


def test_ctrl_c_during_the_llamacpp_check_of_export_exits_130_and_leaves_no_temporary_folder(unexported_gguf_run,
                                                                                            tmp_path):
    out = tmp_path / "e2"
    command = [sys.executable, "-m", "loraprune", "export", str(unexported_gguf_run), "--out", str(out), "--format", "gguf"]
    process, seconds, servers = _interrupt_once_llamacpp_runs(command, settle=0.5)
    assert process.returncode == 130 and seconds < 10
    assert list(tmp_path.iterdir()) == []  # neither e2 nor .e2.tmp-*
    assert not any(_alive(pid) for pid in servers)


def test_ctrl_c_while_prune_checks_its_gguf_exits_130_with_the_command_that_finishes_the_run(smollm2_tokenizer,
                                                                                            tmp_path):
    model_dir, text = save_gguf_tiny_run_inputs(tmp_path, smollm2_tokenizer)
    out = tmp_path / "out"
    process, seconds, _ = _interrupt_once_llamacpp_runs(gguf_tiny_prune_command(model_dir, text, out), settle=0.5)
    stderr = process.stderr_text
    assert process.returncode == 130 and seconds < 10, stderr
    assert stderr.strip().splitlines()[-1].endswith(f"Finish it with: loraprune prune --resume {out}.partial")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["english.txt", "out.partial", "tiny-smollm2"])


def test_a_file_llamacpp_cannot_load_is_one_error(tmp_path):
    from loraprune.export.llamacpp import LlamaCpp

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LoraPruneError, match="llama.cpp cannot load"):
        LlamaCpp(bad)
