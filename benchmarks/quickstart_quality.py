"""The README quickstart's model in and out of domain: its command as a user runs it, and variants.

Each variant is one `loraprune prune` command line (run as a subprocess, as a user would); the
figures are read back from the loraprune.json it writes: pydoc perplexity before and after (the
quickstart's own text, in domain), Austen's *Northanger Abbey* (out of domain), fidelity to dense
and the repetition score. Results are saved after every run, so an interrupted script resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_sections import RESULTS, machine_line, write_section

OUT = Path(__file__).resolve().parent.parent / "runs" / "benchmarks" / "quickstart"
QUICKSTART = ("prune", "--sparsity", "0.2", "--steps", "60", "--seq-len", "128")
# name: arguments added to the quickstart command, in the order they run.
VARIANTS = {
    "quickstart": (),
    "pydoc+self": ("--data", "pydoc+self"),
    "pydoc+self+distill": ("--data", "pydoc+self", "--distill", "0.5"),
}
TARGET_RATIO = 1.8  # the target: pydoc ≤ 1.8× dense ...
TARGET_REPETITION = 0.05  # ... and a repetition score within 0.05 of dense


def command(name: str) -> list[str]:
    """The CLI arguments of one variant, with its output folder."""
    return [*QUICKSTART, *VARIANTS[name], "--out", str(OUT / name), "--overwrite"]


def shown(name: str) -> str:
    """The command as a user types it (output folder shortened)."""
    return "loraprune " + " ".join([*QUICKSTART, *VARIANTS[name], "--out", name])


def measure(name: str) -> dict:
    """Run one variant through the CLI and collect its loraprune.json figures."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loraprune", *command(name)], check=True)
    seconds = time.perf_counter() - started
    report = json.loads((OUT / name / "loraprune.json").read_text())
    before, after = report["out_of_domain"]["before"], report["out_of_domain"]["after"]
    return {"command": shown(name), "data": report["data"], "lr": report["config"]["lr"],
            "achieved_sparsity": report["achieved_sparsity"],
            "in_domain": {"before": report["perplexity_before"], "after": report["perplexity_after"]},
            "out_of_domain": {"before": before["perplexity"], "after": after["perplexity"]},
            "fidelity": after.get("fidelity"),
            "repetition": {"before": before["generation"]["repetition"], "after": after["generation"]["repetition"]},
            "samples_after": after["generation"]["samples"], "wall_seconds": seconds,
            "load_average": os.getloadavg()}


def ratios(row: dict) -> tuple[float, float, float]:
    """(in-domain ratio to dense, out-of-domain ratio, repetition after minus dense)."""
    inside = row["in_domain"]["after"]["ppl"] / row["in_domain"]["before"]["ppl"]
    outside = row["out_of_domain"]["after"]["ppl"] / row["out_of_domain"]["before"]["ppl"]
    return inside, outside, row["repetition"]["after"] - row["repetition"]["before"]


def verdict(row: dict) -> str:
    """The issue's two targets for the quickstart model, met or missed by how much."""
    inside, _, extra = ratios(row)
    parts = [f"pydoc {inside:.2f}× dense: " + ("met" if inside <= TARGET_RATIO
                                                else f"missed by {inside / TARGET_RATIO - 1:.0%}"),
             f"repetition {extra:+.3f} from dense: " + ("met" if extra <= TARGET_REPETITION
                                                        else f"missed by {extra - TARGET_REPETITION:.3f}")]
    return "; ".join(parts)


def section(results: dict) -> str:
    """The docs section: every variant's command and figures, and whether the targets were met."""
    rows = results["runs"]
    first = next(iter(rows.values()), None)
    lines = ["## Quality: the README quickstart's model", "",
             (f"Command: `python benchmarks/quickstart_quality.py`, which runs each command below (`loraprune "
              f"prune`, SmolLM2-135M, defaults otherwise: global allocation, `fisher`, lr {lrs(rows)}, LoRA rank 8) "
              f"and reads its loraprune.json. Machine: {results['machine']}.")]
    if first is not None:
        ind, ood = first["in_domain"]["before"], first["out_of_domain"]["before"]
        lines.append("")
        lines.append(f"In domain: pydoc topics, validation part ({ind['n_tokens']} tokens predicted in {ind['n_windows']} "
                     f"windows of {ind['seq_len']}); out of domain: Northanger Abbey ({ood['n_tokens']} tokens in "
                     f"{ood['n_windows']} windows of {ood['seq_len']}); dense {ind['ppl']:.2f} and {ood['ppl']:.2f}. "
                     "Repetition: mean share of repeated 4-grams in greedy 64-token continuations of 21 fixed prompts. "
                     "`geo`: the geometric mean of the two ratios, the quality suite's selection measure. KL(dense ‖ pruned) "
                     "in nats per token on the first 4,096 Northanger Abbey tokens. "
                     "Target (issue 16): pydoc ≤ 1.8× dense and repetition within 0.05 of dense.")
    lines += ["", ("| variant | command | ppl pydoc | ppl Northanger | pydoc × dense | Northanger × dense | geo | KL | "
                   "repetition (dense) | wall s |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        inside, outside, _ = ratios(row)
        kl = (row["fidelity"] or {}).get("kl", float("nan"))
        lines.append(f"| {name} | `{row['command']}` | {row['in_domain']['after']['ppl']:.2f} | "
                     f"{row['out_of_domain']['after']['ppl']:.2f} | {inside:.2f} | {outside:.2f} | {(inside * outside) ** 0.5:.2f} | "
                     f"{kl:.3f} | "
                     f"{row['repetition']['after']:.3f} ({row['repetition']['before']:.3f}) | "
                     f"{row['wall_seconds']:.0f} |")
    lines.append("")
    lines += [f"- `{name}`: {verdict(row)}." for name, row in rows.items()]
    missing = [name for name in VARIANTS if name not in rows]
    if missing:
        lines += ["", f"Not run (the machine's time ran out; the script resumes with them): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def lrs(rows: dict) -> str:
    """The learning rates the rows ran at (prune's default when each ran)."""
    return " / ".join(sorted({f"{row['lr']:g}" for row in rows.values()})) or "the default"


def saved(path: Path) -> dict:
    """The results so far."""
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None, help="run only these variants")
    parser.add_argument("--from-json", action="store_true", help="rewrite the docs section from saved results")
    args = parser.parse_args(argv)
    path = RESULTS / "quickstart_quality.json"
    for name in [] if args.from_json else (args.only or VARIANTS):
        if name in saved(path)["runs"]:
            continue
        print(f"--- {shown(name)}", flush=True)
        row = measure(name)
        results = saved(path)  # another process (--only) may have added a variant meanwhile
        results["runs"][name] = row
        results["machine"] = machine_line()
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        partial.replace(path)
    results = saved(path)
    results["runs"] = {name: results["runs"][name] for name in VARIANTS if name in results["runs"]}
    write_section("quickstart-quality", section(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
