"""Putting an export in place: the folders a killed export left behind are removed by the next one."""

from __future__ import annotations

import os
import subprocess
import sys

from loraprune.export.placement import move_into_place, temporary_folder_beside


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           check=True, capture_output=True, text=True)
    return int(child.stdout)


def test_a_killed_exports_temporary_folder_is_removed_and_a_live_ones_is_kept(tmp_path):
    out = tmp_path / "model"
    abandoned = tmp_path / f".model.tmp-{_dead_pid()}-abcd"
    live = tmp_path / f".model.tmp-{os.getppid()}-efgh"
    other = tmp_path / f".other.tmp-{_dead_pid()}-ijkl"
    for folder in (abandoned, live, other):
        folder.mkdir()
        (folder / "model.gguf").write_bytes(b"x" * 1024)
    tmp = temporary_folder_beside(out)
    assert not abandoned.exists() and live.is_dir() and other.is_dir()
    move_into_place(tmp, out)
    assert out.is_dir() and not tmp.exists()
