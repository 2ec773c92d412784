"""The benchmark suite's quick mode, so the scripts that write docs/benchmarks.md cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import METHODS


@pytest.mark.slow
def test_quick_benchmark_suite_runs_every_method_and_writes_nothing_into_docs(tmp_path, austen_dir, smollm2):
    docs_before = sorted(p.name for p in (ROOT / "docs").rglob("*")) if (ROOT / "docs").exists() else []
    results = tmp_path / "quality-quick.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick",
                           "--results", str(results)], check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(results.read_text())["runs"]
    methods = {row["method"] for row in runs.values()}
    assert methods == set(METHODS)
    for row in runs.values():
        assert row["ppl_austen"] > 1 and row["ppl_pydoc"] > 1
        if row["target_sparsity"]:
            assert abs(row["achieved_sparsity"] - row["target_sparsity"]) < 0.01
    assert "lora_vs_grad" in done.stdout and "default_vs_finetune" in done.stdout
    assert sorted(p.name for p in (ROOT / "docs").rglob("*")) == docs_before
