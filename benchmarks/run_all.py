"""Produce every section of docs/benchmarks.md in one command: quality, memory, agreement, speed.

`--quick` is the smoke run (minutes): it checks the whole path and writes nothing into docs/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str) -> None:
    print(f"=== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; writes nothing into docs/")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per quality run")
    parser.add_argument("--results", type=Path, default=None, help="with --quick: where its JSON goes")
    args = parser.parse_args(argv)
    if args.quick:
        results = args.results or Path("quality-quick.json")
        _run("quality.py", "--quick", "--no-docs", "--results", str(results))
        _run("memory.py", "--steps", "3", "--seq-len", "64", "--no-docs")
        _run("agreement.py", "--blocks", "2", "--seq-len", "64", "--no-docs")
        return 0
    _run("quality.py", *(["--steps", str(args.steps)] if args.steps else []))
    _run("memory.py")
    _run("agreement.py")
    exports = HERE.parent / "runs" / "benchmarks"
    _run("speed.py", "--pruned", str(exports / "lora-0.2"), str(exports / "lora-0.5"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
