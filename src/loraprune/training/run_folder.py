"""The folder a run lives in until its model is exported: ``OUT.partial/`` with its step log.

Checkpoints go into its ``checkpoint/`` (see checkpoint.py); ``log.jsonl`` holds one line per step.
"""

from __future__ import annotations

import json
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
LOG_FILE = "log.jsonl"


def partial_dir(out: Path) -> Path:
    """Where an unfinished run keeps its checkpoints until the pruned model is exported."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def append_log(run_dir: Path, record: dict) -> None:
    """Add one step's record to the run's log."""
    with open(run_dir / LOG_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(run_dir: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run starts from."""
    path = run_dir / LOG_FILE
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and _logged_step(line) <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut short by a kill: drop it with the later ones
        return float("inf")
