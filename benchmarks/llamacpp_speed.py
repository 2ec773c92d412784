"""Prefill and decode speed of pruned SmolLM2 GGUF files in llama.cpp, against the dense model.

Runs `loraprune bench speed --runtime llamacpp` on four GGUF files (uniform and global allocation at
20 % and 50 %) and writes its JSON and a docs/benchmarks.md section. Speed depends on the kept
widths, not on how well the model recovered, so the files come from short runs (20 steps).
Run it on a quiet machine: other processes change the timings far more than pruning does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_sections import RESULTS, write_section

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "runs" / "speed"
VARIANTS = [(allocation, sparsity) for sparsity in ("0.2", "0.5") for allocation in ("uniform", "global")]
BUILD = ("loraprune prune --data austen --sparsity S --allocation A --format gguf --steps 20 --prune-every 2 "
         "--seq-len 128 --eval-tokens 1024 --out runs/speed/smol-A-S")
BENCH = "loraprune bench speed --runtime llamacpp --pruned {files} --threads 2 --repeats 5 --json"


def build_and_measure() -> dict:
    """Write the four GGUF files that are missing, then time them in llama.cpp."""
    loraprune = str(Path(sys.executable).parent / "loraprune")
    names = []
    for allocation, sparsity in VARIANTS:
        out = FILES / f"smol-{allocation}-{sparsity}"
        names.append(str(out))
        if not (out / "model.gguf").exists():
            command = BUILD.replace("A", allocation).replace(" S ", f" {sparsity} ").replace("-S", f"-{sparsity}")
            subprocess.run([loraprune, *command.split()[1:], "--no-progress", "--overwrite"], check=True, cwd=ROOT)
    done = subprocess.run([loraprune, *BENCH.format(files=" ".join(names)).split()[1:]], check=True,
                          capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout)


def section(results: dict) -> str:
    """Markdown: per file, prefill and decode tokens/s, speed-ups and the ideal ratios."""
    dense = results["models"][0]
    machine = results["machine"]
    lines = [
        "## Speed in llama.cpp (GGUF)",
        "",
        (f"Command: `python benchmarks/llamacpp_speed.py` (builds the files with `{BUILD}`, then runs "
        f"`{BENCH.format(files='…')}`). Machine: {machine['cpu']}, {machine['logical_cores']} cores, "
        f"llama.cpp through xllamacpp, f32 weights, {results['threads']} threads; load average "
        f"{results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} after (other "
        f"jobs paused). Prefill {results['prompt_tokens']} tokens, decode {results['new_tokens']} tokens, median "
        f"of {results['repeats']} alternated repeats. Ideal ratios are counted from the files: linear-layer "
        "FLOPs per token (prefill) and weight bytes (decode)."),
        "",
        ("| model | architecture | prefill tok/s | decode tok/s | prefill speed-up (ideal) | "
        "decode speed-up (ideal) | decode / ideal |"),
        "|---|---|---:|---:|---:|---:|---:|",
        (f"| dense | {dense['architecture']} | {dense['prefill_tokens_per_second_median']:.1f} | "
        f"{dense['decode_tokens_per_second_median']:.2f} | 1.00 | 1.00 | |"),
    ]
    for model, ratio in zip(results["models"][1:], results["comparisons"]):
        lines.append(f"| {Path(ratio['pruned']).name} | {ratio['architecture']} | "
                     f"{model['prefill_tokens_per_second_median']:.1f} | {model['decode_tokens_per_second_median']:.2f} | "
                     f"{ratio['prefill_speedup']:.2f} ({ratio['prefill_ideal_flops']:.2f}) | "
                     f"{ratio['decode_speedup']:.2f} ({ratio['decode_ideal_bytes']:.2f}) | "
                     f"{ratio['decode_fraction_of_ideal_bytes']:.2f} |")
    fractions = {Path(r["pruned"]).name: r["decode_fraction_of_ideal_bytes"] for r in results["comparisons"]}
    worst = min(fractions.get("smol-uniform-0.5", 1), fractions.get("smol-global-0.5", 1))
    lines += ["", (f"Target: decode ≥ 0.9× the ideal byte ratio at 50 %: {worst:.2f} at worst, "
                   + ("met." if worst >= 0.9 else f"missed by {1 - worst / 0.9:.0%}. ") +
                   "At 135M parameters a decoded token reads only 270–540 MB of weights, so llama.cpp's "
                   "fixed cost per token (attention over the KV cache, the 49,152-way output layer, which "
                   "pruning does not shrink and which is counted in the bytes, sampling, graph set-up) "
                   "is a large share; per-layer (deci) graphs add more small operations than uniform ones. "
                   "The single prefill runs vary by ±15 % on this machine."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-json", action="store_true", help="rewrite the docs from saved results, no runs")
    args = parser.parse_args(argv)
    path = RESULTS / "llamacpp_speed.json"
    if args.from_json:
        results = json.loads(path.read_text())
    else:
        results = build_and_measure()
        path.write_text(json.dumps(results, indent=1) + "\n")
    write_section("llamacpp_speed", section(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
