"""Write one named section of docs/benchmarks.md between markers, leaving the others alone.

Each benchmark script owns one section, so they can be rerun independently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
BENCHMARKS_MD = DOCS / "benchmarks.md"
RESULTS = DOCS / "results"
HEADER = ("# Benchmarks\n\nEvery number below is written by the script named in its section; "
          "rerun that script to refresh it. Raw results are JSON files in [results/](results/).\n")


def write_section(name: str, text: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the section ``name`` between its markers, or append it."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.exists() else HEADER
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        current = before + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(current)


def save_results(name: str, results: dict) -> Path:
    """Write raw results as docs/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def machine_line() -> str:
    """CPU model, cores, library versions and load, for the head of a section."""
    from loraprune.evaluation.speed import machine_info

    m = machine_info()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} ({m['torch_threads']} "
            f"threads), transformers {m['transformers']}, CPU only; load average {load} when written")


def side_by_side(columns: int, size: tuple[float, float]):
    """(figure, axes) of ``columns`` plots in a row, drawn without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=size)


def save_figure(fig, path: Path) -> None:
    """Write the figure as docs' PNGs are written, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
