"""The README quickstart's model in and out of domain: its command as a user runs it, and variants.

Each variant is one `loraprune prune` command line (run as a subprocess, as a user would); the
figures are read back from the loraprune.json it writes: pydoc perplexity before and after (the
quickstart's own text, in domain), Austen's *Northanger Abbey* (out of domain), fidelity to dense,
the repetition score in plain greedy decoding and under the repetition penalty the run ships with,
and the summary's greedy samples. Results are saved after every run, so an interrupted script resumes.
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
    "austen": ("--data", "austen"),  # the "default 20 % Austen run", at the quickstart's budget
    # Units scored on text the dense model samples from BOS, LoRA still on the run's text.
    "cal:self": ("--calibration", "self"),
    "austen+cal:self": ("--data", "austen", "--calibration", "self"),
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
            "samples_after": after["generation"]["samples"], "summary_samples": report["greedy_samples"],
            "decoding": report["decoding"], "wall_seconds": seconds,
            "load_average": os.getloadavg(),
            "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count())}  # the prune process's torch threads


def ratios(row: dict) -> tuple[float, float, float]:
    """(in-domain ratio to dense, out-of-domain ratio, repetition after minus dense)."""
    inside = row["in_domain"]["after"]["ppl"] / row["in_domain"]["before"]["ppl"]
    outside = row["out_of_domain"]["after"]["ppl"] / row["out_of_domain"]["before"]["ppl"]
    return inside, outside, row["repetition"]["after"] - row["repetition"]["before"]


def verdict(row: dict) -> str:
    """The issue's two targets for the quickstart model, met or missed by how much."""
    inside, _, extra = ratios(row)
    domain = "pydoc" if row["data"].startswith("pydoc") else row["data"]
    parts = [f"{domain} {inside:.2f}× dense" + ((": met" if inside <= TARGET_RATIO
                                                  else f": missed by {inside / TARGET_RATIO - 1:.0%}")
                                                 if domain == "pydoc" else " (the pydoc target is for pydoc runs)"),
             f"greedy repetition {extra:+.3f} from dense: " + _against_target(extra)]
    if "decoding" not in row:
        return "; ".join(parts + ["run before the decoding default existed"])
    penalty, shipped = shipped_repetition(row)
    if penalty != 1.0:
        parts.append(f"with the repetition penalty it ships ({penalty:g}) {shipped - row['repetition']['before']:+.4f}"
                     f" from dense's plain greedy: {_against_target(shipped - row['repetition']['before'])}")
    return "; ".join(parts)


def _against_target(extra: float) -> str:
    missed = extra - TARGET_REPETITION
    return "met" if missed <= 0 else f"missed by {missed:.4f}" if missed < 0.001 else f"missed by {missed:.3f}"


def shipped_repetition(row: dict) -> tuple[float, float]:
    """(the repetition penalty the run wrote with its model, the health prompts' repetition under it)."""
    decoding = row["decoding"]
    health = decoding["generation"]
    return decoding["repetition_penalty"], health["repetition"] if health else row["repetition"]["after"]


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
        lines.append(f"In domain: the validation part of the run's text: pydoc topics ({ind['n_tokens']} tokens predicted "
                     f"in {ind['n_windows']} windows of {ind['seq_len']}); out of domain: Northanger Abbey ({ood['n_tokens']} "
                     f"tokens in {ood['n_windows']} windows of {ood['seq_len']}); dense {ind['ppl']:.2f} and {ood['ppl']:.2f}. "
                     "The `austen` run swaps the two (in domain Northanger Abbey, out of domain pydoc). "
                     "Repetition: mean share of repeated 4-grams in greedy 64-token continuations of 21 fixed prompts. "
                     "`penalty shipped`: the repetition penalty `prune` chose and wrote with the model "
                     "(generation_config.json, GGUF `general.sampling.penalty_repeat`): the mildest of 1.05, 1.1, … "
                     "under which its greedy continuations of 12 other fixed prompts (prose, code, facts, chat) repeat "
                     "no more than the dense model's, prompt by prompt (on average at most 0.01 beyond dense's on the "
                     "same prompt); `repetition under it`: the 21 prompts decoded with it, prompts "
                     "it was not chosen on. "
                     "`geo`: the geometric mean of the two ratios, the quality suite's selection measure. KL(dense ‖ pruned) "
                     "in nats per token on the first 4,096 out-of-domain tokens. "
                     "Target (issue 16): pydoc ≤ 1.8× dense and repetition within 0.05 of dense.")
    lines += ["", ("| variant | command | ppl in domain | ppl out of domain | in × dense | out × dense | geo | KL | "
                   "repetition, greedy (dense) | penalty shipped | repetition under it | wall s |"),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        inside, outside, _ = ratios(row)
        kl = (row["fidelity"] or {}).get("kl", float("nan"))
        penalty, shipped = shipped_repetition(row) if "decoding" in row else (None, None)
        decoded = f"{penalty:g} | {shipped:.3f}" if penalty is not None else "— | —"
        lines.append(f"| {name} | `{row['command']}` | {row['in_domain']['after']['ppl']:.2f} | "
                     f"{row['out_of_domain']['after']['ppl']:.2f} | {inside:.2f} | {outside:.2f} | {(inside * outside) ** 0.5:.2f} | "
                     f"{kl:.3f} | "
                     f"{row['repetition']['after']:.3f} ({row['repetition']['before']:.3f}) | {decoded} | "
                     f"{row['wall_seconds']:.0f} |")
    lines.append("")
    one_thread = [name for name, row in rows.items() if row.get("threads") == 1]
    if one_thread:
        named = ", ".join(f"`{name}`" for name in one_thread)
        lines += [(f"Wall times: {named} ran two at once on one thread each (OMP_NUM_THREADS=1), the others on "
                   "both cores, so only rows of the same kind compare."), ""]
    lines += [f"- `{name}`: {verdict(row)}." for name, row in rows.items()]
    lines += summary_samples(rows)
    missing = [name for name in VARIANTS if name not in rows]
    if missing:
        lines += ["", f"Not run (the machine's time ran out; the script resumes with them): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def summary_samples(rows: dict) -> list[str]:
    """The prune summary's three greedy samples of each run: dense, pruned, pruned under its penalty."""
    lines = ["", "The summary's greedy samples (24 tokens; `prune` prints them):", ""]
    for name, row in rows.items():
        penalty = row["decoding"]["repetition_penalty"] if "decoding" in row else None
        for sample in row.get("summary_samples", []):
            lines.append(f"- `{name}`, {sample['prompt']!r}: dense {sample['before']!r}; pruned {sample['after']!r}"
                         + (f"; pruned, penalty {penalty:g}: {sample['after_with_penalty']!r}"
                            if "after_with_penalty" in sample else ""))
    return lines if len(lines) > 3 else []


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
