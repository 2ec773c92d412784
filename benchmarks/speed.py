"""Measure dense vs pruned speed; write docs/results/speed.json, docs/speed.png and the Speed section.

Every number in the section comes from this run; rerun it to refresh the docs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from docs_sections import DOCS, save_results, write_section

from loraprune.evaluation.speed import benchmark_speed, speed_table
from loraprune.models.loading import resolve_model_dir

# What we learned measuring this (the measured numbers are in the tables above).
NOTES = [
    "Reading the numbers:",
    "",
    ("- Prefill is compute-bound: time follows the FLOPs, so it comes closest to the "
    "ideal. Pruned FFN widths that are not multiples of 64 (e.g. 581 vs 576) cost at most a few "
    "percent in an isolated up/down matmul on this CPU, so `--round-to` matters little here."),
    ("- Decode (one token per step) is bound by everything that does not shrink with the widths: "
    "RMSNorms, rotary embeddings, KV-cache updates, residual adds and the per-operator dispatch "
    "of every layer in eager PyTorch, plus the lm_head, which pruning leaves whole (its share "
    "of the weights is given above). The two bounds in the second table are Amdahl bounds: the "
    "best decode speedup if matmul and attention time shrank by the FLOP ratio and the rest "
    "stayed. 'Profile' takes the rest from torch.profiler (which inflates small ops, so it is "
    "pessimistic); 'floor' times a model of the same depth with one head, one FFN channel and "
    "a 64-token vocabulary, whose decode step is that rest."),
    ("- On a machine shared with other jobs, torch's default of one thread per core oversubscribes "
    "the CPU and every small operator waits for a descheduled thread: with two threads we "
    "measured several times slower prefill and decode than with `--threads 1`. Record the load "
    "average (above) and prefer `--threads 1` unless the machine is idle."),
]


def speed_section(result: dict) -> str:
    """The Speed section of docs/benchmarks.md, from a benchmark result."""
    m, s = result["machine"], result["settings"]
    dense = result["models"][0]
    lines = [
        "## Speed",
        "",
        (f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}; load average "
        f"{m['load_average_before']} before, {m['load_average_after']} after."),
        "",
        (f"Batch 1, float32. Prefill: one forward pass over {s['prompt_tokens']} prompt tokens "
        f"(last-token logits, as `generate` does). Decode: {s['new_tokens']} greedy tokens with the "
        f"KV cache after that prompt, prefill excluded. Models alternate inside each of "
        f"{s['repeats']} repeats after a warm-up; medians shown. Speedup = dense time / pruned time. "
        "Ideal (FLOPs) counts every linear layer's multiply-adds (lm_head included) plus attention "
        "scores and values at the actual context; ideal (bytes) is the ratio of weight bytes a "
        "decode step reads."),
        "",
        (f"Dense `{dense['name']}`: {dense['parameters']:,} parameters, prefill "
        f"{dense['prefill_seconds_median'] * 1000:.0f} ms, decode "
        f"{dense['decode_tokens_per_second_median']:.1f} tokens/s; its lm_head holds "
        f"{dense['lm_head_parameters'] / dense['parameters']:.0%} of the parameters."),
        "",
        speed_table(result),
        "",
        ("| pruned model | widths (heads/kv/ffn) | prefill ms | decode tokens/s "
        "| prefill % of ideal | decode % of ideal | decode bound (profile) | decode bound (floor) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_name = {row["name"]: row for row in result["models"]}
    for c in result["comparisons"]:
        row = by_name[c["pruned"]]
        w = row["widths"]
        lines.append(
            f"| {c['pruned']} | {w['heads']}/{w['kv_heads']}/{w['intermediate_size']} "
            f"| {row['prefill_seconds_median'] * 1000:.0f} | {row['decode_tokens_per_second_median']:.1f} "
            f"| {c['prefill_fraction_of_ideal']:.0%} | {c['decode_fraction_of_ideal']:.0%} "
            f"| {c['decode_bound_if_only_matmuls_shrink']:.2f}x "
            f"| {c['decode_bound_with_measured_floor']:.2f}x |")
    lines += ["", ("Where a decode step's time goes (torch.profiler, self CPU time; the profiler "
              "inflates the many small ops, so read these as shares):"), "",
              "| model | matmul | attention kernel | everything else |", "|---|---:|---:|---:|"]
    for row in result["models"]:
        p = row["decode_profile_ms_per_token"]
        total = sum(p.values())
        lines.append(f"| {row['name']} | {p['matmul'] / total:.0%} | {p['attention'] / total:.0%} "
                     f"| {p['other'] / total:.0%} |")
    lines += ["", *NOTES]
    lines += ["", "Written by `benchmarks/speed.py`; raw timings in [results/speed.json](results/speed.json).",
              "", "![measured vs ideal speedups](speed.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Measured vs ideal speedups, prefill and decode, one group of bars per pruned model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons = result["comparisons"]
    names = [c["pruned"] for c in comparisons]
    series = [("prefill measured", "prefill_speedup"), ("prefill ideal (FLOPs)", "prefill_ideal_flops"),
              ("decode measured", "decode_speedup"), ("decode ideal (FLOPs)", "decode_ideal_flops"),
              ("decode ideal (bytes)", "decode_ideal_bytes")]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) + 2), 4))
    for i, (label, key) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [c[key] for c in comparisons], width, label=label,
               hatch="//" if "ideal" in label else None, alpha=0.6 if "ideal" in label else 1.0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title(f"{result['machine']['cpu']}, {result['machine']['torch_threads']} threads, batch 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="smollm2-135m", help="dense model (any form --model takes)")
    parser.add_argument("--pruned", nargs="+", default=[], type=Path, help="pruned checkpoint folders")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-docs", action="store_true", help="print the section, write nothing")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="rewrite the section and plot from a saved result instead of measuring")
    args = parser.parse_args()
    if not args.pruned and not args.from_json:
        parser.error("pass --pruned DIR [DIR ...] or --from-json FILE")
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        result = benchmark_speed(resolve_model_dir(args.dense), args.pruned, args.prompt_tokens,
                                 args.new_tokens, args.repeats, args.threads)
        result["models"][0]["name"] = args.dense
    section = speed_section(result)
    print(section)
    if args.no_docs:
        print(json.dumps(result["comparisons"], indent=1))
        return
    save_results("speed", result)
    plot(result, DOCS / "speed.png")
    write_section("speed", section)


if __name__ == "__main__":
    main()
