"""Peak resident memory and step times of one training run, and the one-process-per-run harness.

Shared by memory.py and memory_at_scale.py: each measured mode runs in a fresh process (``run_worker``),
which trains while a thread samples the process's RSS (``measured_training``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainingMeasurement:
    """What one training run in this process cost: resident memory and time per step."""

    outcome: object  # the recipe's TrainingOutcome
    rss_after_load_bytes: int
    peak_rss_bytes: int
    step_seconds: list[float]  # steps 2..N: the first is warm-up

    def row(self) -> dict:
        """The JSON fields every memory benchmark records."""
        return {"rss_after_load_bytes": self.rss_after_load_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "training_increase_bytes": self.peak_rss_bytes - self.rss_after_load_bytes,
                "step_seconds_median": statistics.median(self.step_seconds),
                "step_seconds_mean": statistics.fmean(self.step_seconds)}


def measured_training(model, blocks, config, fixed_masks=None, interval: float = 0.02,
                      calibration_blocks=None) -> TrainingMeasurement:
    """Run ``train_while_pruning`` here while sampling this process's RSS every ``interval`` seconds."""
    import psutil

    from loraprune.training.recipe import train_while_pruning

    process = psutil.Process()
    after_load = process.memory_info().rss
    peak, done = [after_load], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            outcome = train_while_pruning(model, blocks, config, Path(run_dir), progress=False, fixed_masks=fixed_masks,
                                          calibration_blocks=calibration_blocks)
            log = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    finally:
        done.set()
        sampler.join()
    elapsed = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(log)]
    return TrainingMeasurement(outcome, after_load, peak[0], elapsed)


def run_worker(command: list[str], label: str) -> dict:
    """Run one measurement in a fresh process; its last stdout line is the JSON row."""
    out = subprocess.run(command, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], flush=True)
        raise SystemExit(f"{label} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def benchmark_parser(description: str, modes, steps: int) -> argparse.ArgumentParser:
    """The arguments every memory benchmark takes: the hidden worker flag, steps, sequence length, docs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", choices=modes, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--from-json", action="store_true", help="rewrite the docs from saved results, no runs")
    return parser
