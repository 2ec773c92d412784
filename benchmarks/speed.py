"""Measure dense vs pruned speed and write docs/speed.json, docs/speed.png and the Speed section.

Every number in the section comes from this run; rerun it to refresh the docs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraprune.loading import resolve_model_dir
from loraprune.speed import benchmark_speed, speed_table

START, END = "<!-- speed:start (written by benchmarks/speed.py) -->", "<!-- speed:end -->"


def speed_section(result: dict) -> str:
    """The Speed section of docs/benchmarks.md, from a benchmark result."""
    m, s = result["machine"], result["settings"]
    dense = result["models"][0]
    lines = [
        "## Speed",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}; load average "
        f"{m['load_average_before']} before, {m['load_average_after']} after.",
        "",
        f"Batch 1, float32. Prefill: one forward pass over {s['prompt_tokens']} prompt tokens "
        f"(last-token logits, as `generate` does). Decode: {s['new_tokens']} greedy tokens with the "
        f"KV cache after that prompt, prefill excluded. Models alternate inside each of "
        f"{s['repeats']} repeats after a warm-up; medians shown. Speedup = dense time / pruned time. "
        "Ideal (FLOPs) counts every linear layer's multiply-adds (lm_head included) plus attention "
        "scores and values at the actual context; ideal (bytes) is the ratio of weight bytes a "
        "decode step reads.",
        "",
        f"Dense `{dense['name']}`: {dense['parameters']:,} parameters, prefill "
        f"{dense['prefill_seconds_median'] * 1000:.0f} ms, decode "
        f"{dense['decode_tokens_per_second_median']:.1f} tokens/s.",
        "",
        speed_table(result),
        "",
        "| pruned model | widths (heads/kv/ffn) | prefill ms | decode tokens/s "
        "| prefill % of ideal | decode % of ideal |",
        "|---|---|---:|---:|---:|---:|",
    ]
    by_name = {row["name"]: row for row in result["models"]}
    for c in result["comparisons"]:
        row = by_name[c["pruned"]]
        w = row["widths"]
        lines.append(
            f"| {c['pruned']} | {w['heads']}/{w['kv_heads']}/{w['intermediate_size']} "
            f"| {row['prefill_seconds_median'] * 1000:.0f} | {row['decode_tokens_per_second_median']:.1f} "
            f"| {c['prefill_fraction_of_ideal']:.0%} | {c['decode_fraction_of_ideal']:.0%} |")
    lines += ["", "Raw timings: [speed.json](speed.json). Plot: ![speed](speed.png)", ""]
    return "\n".join(lines)


def write_section(markdown_path: Path, section: str) -> None:
    """Replace the Speed section between its markers, or append it."""
    block = f"{START}\n{section}{END}\n"
    text = markdown_path.read_text() if markdown_path.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    markdown_path.write_text(text)


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
    parser.add_argument("--pruned", nargs="+", required=True, type=Path, help="pruned checkpoint folders")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    result = benchmark_speed(resolve_model_dir(args.dense), args.pruned, args.prompt_tokens,
                             args.new_tokens, args.repeats, args.threads)
    result["models"][0]["name"] = args.dense
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.docs / "speed.png")
    section = speed_section(result)
    write_section(args.docs / "benchmarks.md", section)
    print(section)


if __name__ == "__main__":
    main()
