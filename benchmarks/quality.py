"""Perplexity after pruning SmolLM2 with each criterion, at the same sparsity, seed, data and steps.

Methods: lora (ours), grad (vanilla Taylor, same pipeline), llm-pruner (one-shot Taylor from a
calibration batch, then LoRA recovery), magnitude, random; plus dense and dense + the same LoRA
fine-tuning. Results are saved after every run, so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loraprune.config import PruneConfig
from loraprune.data import load_text, token_blocks
from loraprune.evaluation.perplexity import perplexity
from loraprune.export.transformers_writer import export_checkpoint
from loraprune.models import count_parameters, spec_for
from loraprune.models.loading import load_model
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks
from loraprune.pruning.target import solve_model_target
from loraprune.training.oneshot import one_shot_masks
from loraprune.training.recipe import train_while_pruning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_sections import RESULTS, machine_line, write_section

PRUNING_METHODS = ("lora", "lora+columns", "grad", "llm-pruner", "magnitude", "random")
# The lora runs' pruned models are exported here for the speed benchmark (not committed).
EXPORTS = Path(__file__).resolve().parent.parent / "runs" / "benchmarks"


@dataclass(frozen=True)
class Settings:
    """One suite's budget; every method gets exactly this."""

    sparsities: tuple[float, ...] = (0.2, 0.5)
    steps: int = 200
    seq_len: int = 128
    lr: float = 2e-4
    prune_every: int = 10
    calibration_blocks: int = 10
    eval_tokens: int = 8192
    eval_seq_len: int = 512
    seed: int = 0


QUICK = Settings(steps=6, seq_len=64, prune_every=1, calibration_blocks=2, eval_tokens=1024, eval_seq_len=256)


def _config(settings: Settings, criterion: str, sparsity: float) -> PruneConfig:
    return PruneConfig(data="austen", criterion=criterion, sparsity=sparsity, steps=settings.steps,
                       seq_len=settings.seq_len, lr=settings.lr, prune_every=settings.prune_every,
                       seed=settings.seed, save_every=10 ** 9)


def run_one(base, method: str, sparsity: float, settings: Settings, train_blocks: torch.Tensor,
            eval_sets: dict[str, torch.Tensor], export_to: Path | None = None, tokenizer=None) -> dict:
    """Prune (or fine-tune) a copy of ``base`` with one method, measure it, optionally export it."""
    model = copy.deepcopy(base)
    total = count_parameters(model)
    shape = LayerShape.from_config(model.config)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        if method == "dense":
            pruned, achieved, steps = model, 0.0, 0
        else:
            fixed = None
            if method == "dense+lora":
                config = _config(settings, "lora", sparsity)  # nothing is pruned: masks stay full
                fixed = ModelMasks.full(shape, model.config.num_hidden_layers)
            elif method == "lora+columns":  # the reference code's grouping: o/down columns scored too
                config = _config(settings, "lora", sparsity)
                config.lora_columns = True
            elif method == "llm-pruner":
                config = _config(settings, "grad", sparsity)
                calibration = train_blocks[: settings.calibration_blocks]
                fixed = one_shot_masks(model, calibration, config, solve_model_target(model, config))
            else:
                config = _config(settings, method, sparsity)
            outcome = train_while_pruning(model, train_blocks, config, Path(run_dir), progress=True,
                                      fixed_masks=fixed)
            pruned, achieved, steps = outcome.model, outcome.achieved_sparsity, outcome.steps
            kept = outcome.masks.kept_counts()
    seconds = time.perf_counter() - started
    pruned.eval()
    row = {"method": method, "target_sparsity": sparsity, "achieved_sparsity": achieved,
           "parameters": round(total * (1 - achieved)), "steps": steps, "wall_seconds": seconds}
    if method != "dense":
        row["kept_per_layer"] = kept
    for name, blocks in eval_sets.items():
        row[f"ppl_{name}"] = perplexity(pruned, blocks, progress=False).ppl
    if export_to is not None:
        report = {"source_model": "smollm2-135m", "criterion": method, "data": "austen", "steps": steps,
                  "seed": settings.seed, "target_sparsity": sparsity, "achieved_sparsity": achieved,
                  "written_by": "benchmarks/quality.py"}
        export_checkpoint(pruned, tokenizer, outcome.masks, spec_for(base.config), report, export_to,
                          overwrite=True)
        row["exported_to"] = str(export_to)
    return row


def run_suite(settings: Settings, results_path: Path) -> dict:
    """Run every method at every sparsity, skipping runs already recorded with the same settings."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("settings") != json.loads(json.dumps(asdict(settings))):  # JSON turns tuples into lists
        results = {"settings": asdict(settings), "runs": {}}
    base, tokenizer = load_model("smollm2-135m")
    train_blocks = token_blocks(tokenizer, load_text("austen", "train"), settings.seq_len)
    eval_sets = {
        "austen": token_blocks(tokenizer, load_text("austen", "validation"), settings.eval_seq_len,
                               settings.eval_tokens),
        "pydoc": token_blocks(tokenizer, load_text("pydoc", "validation"), settings.eval_seq_len,
                              settings.eval_tokens),
    }
    results["eval"] = {name: {"windows": int(b.shape[0]), "seq_len": int(b.shape[1]),
                              "tokens": int(b.numel())} for name, b in eval_sets.items()}
    plan = [("dense", 0.0), ("dense+lora", 0.0)]
    plan += [(method, s) for s in settings.sparsities for method in PRUNING_METHODS]
    for method, sparsity in plan:
        key = f"{method}@{sparsity}"
        if key in results["runs"]:
            continue
        print(f"--- {key}", flush=True)
        export_to = EXPORTS / f"{method}-{sparsity}" if method == "lora" and settings != QUICK else None
        results["runs"][key] = run_one(base, method, sparsity, settings, train_blocks, eval_sets,
                                       export_to, tokenizer)
        print(json.dumps({k: v for k, v in results["runs"][key].items() if k != "kept_per_layer"}), flush=True)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    results["machine"] = machine_line()
    return results


def quality_section(results: dict, command: str) -> str:
    """Markdown table of the suite, with its command, machine and evaluation protocol."""
    s, ev = results["settings"], results["eval"]
    lines = [
        "## Quality: perplexity after pruning SmolLM2-135M",
        "",
        f"Command: `{command}`. Machine: {results['machine']}.",
        "",
        (f"Every method: same seed ({s['seed']}), Austen training split (Emma, Mansfield Park, Pride and "
        f"Prejudice, Sense and Sensibility), {s['steps']} optimizer steps of 1×{s['seq_len']} tokens, "
        f"LoRA rank 8 on all projections, lr {s['lr']}. `lora+columns` also scores o_proj/down_proj "
        "columns with the LoRA estimate, as the reference code does. `llm-pruner` scores once with (∇W⊙W)² on "
        f"{s['calibration_blocks']} calibration blocks, prunes, then recovers with LoRA for the same steps. "
        f"Perplexity of the masked model (identical to the exported one) on Northanger Abbey "
        f"({ev['austen']['tokens']} tokens in {ev['austen']['windows']} windows of {ev['austen']['seq_len']}) "
        f"and on CPython's pydoc topics, validation part ({ev['pydoc']['tokens']} tokens in "
        f"{ev['pydoc']['windows']} windows of {ev['pydoc']['seq_len']}). Wall times include "
        "evaluation, and some runs of this table shared the two cores with other jobs: for step "
        "times, see the memory section, measured one process at a time."),
        "",
        "| method | target | achieved sparsity | parameters | ppl Northanger Abbey | ppl pydoc | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = {m: i for i, m in enumerate(("dense", "dense+lora", *PRUNING_METHODS))}
    rows = sorted(results["runs"].values(), key=lambda r: (r["target_sparsity"], order[r["method"]]))
    for row in rows:
        lines.append(f"| {row['method']} | {row['target_sparsity']:.2f} | {row['achieved_sparsity']:.4f} | "
                     f"{row['parameters'] / 1e6:.1f} M | {row['ppl_austen']:.2f} | {row['ppl_pydoc']:.2f} | "
                     f"{row['wall_seconds']:.0f} |")
    lines.append("")
    for sparsity in s["sparsities"]:
        pruned = [r for r in rows if r["target_sparsity"] == sparsity]
        best = min(pruned, key=lambda r: r["ppl_austen"])
        lora = next((r for r in pruned if r["method"] == "lora"), None)
        if lora:
            lines.append(f"- At {sparsity}: lowest Northanger Abbey perplexity `{best['method']}` "
                         f"({best['ppl_austen']:.2f}); `lora` {lora['ppl_austen']:.2f}, "
                         f"{lora['ppl_austen'] / best['ppl_austen']:.2f}× the best.")
    lines += ["", "![perplexity vs sparsity](quality.png) ![kept widths per layer](kept_widths.png)", ""]
    return "\n".join(lines)


def plot(results: dict, folder: Path) -> None:
    """Perplexity vs sparsity per method, and per-layer kept widths of the lora runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["runs"].values())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, text in zip(axes, ("austen", "pydoc")):
        for method in PRUNING_METHODS:
            points = sorted((r["achieved_sparsity"], r[f"ppl_{text}"]) for r in runs if r["method"] == method)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        for r in runs:
            if r["method"] in ("dense", "dense+lora"):
                ax.axhline(r[f"ppl_{text}"], linestyle="--", linewidth=0.8, color="grey")
        ax.set(xlabel="whole-model sparsity", ylabel="perplexity", yscale="log",
               title="Northanger Abbey" if text == "austen" else "pydoc topics")
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "quality.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in runs:
        if r["method"] == "lora":
            layers = range(len(r["kept_per_layer"]))
            ax[0].plot(layers, [k["heads"] for k in r["kept_per_layer"]], marker=".", label=f"{r['target_sparsity']}")
            ax[1].plot(layers, [k["ffn"] for k in r["kept_per_layer"]], marker=".", label=f"{r['target_sparsity']}")
    ax[0].set(xlabel="layer", ylabel="kept query heads", title="lora: attention")
    ax[1].set(xlabel="layer", ylabel="kept FFN channels", title="lora: FFN")
    for a in ax:
        a.legend(title="sparsity")
    fig.tight_layout()
    fig.savefig(folder / "kept_widths.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps, small evaluation")
    parser.add_argument("--steps", type=int, default=None, help="override the optimizer steps per run")
    parser.add_argument("--results", type=Path, default=None, help="JSON file (default docs/results/quality.json)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md or plots")
    parser.add_argument("--from-json", action="store_true", help="rewrite the docs from saved results, no runs")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.steps:
        settings = Settings(**{**asdict(settings), "steps": args.steps})
    path = args.results or RESULTS / ("quality-quick.json" if args.quick else "quality.json")
    if args.from_json:
        results = json.loads(path.read_text())
        args.steps = results["settings"]["steps"] if results["settings"]["steps"] != Settings().steps else None
    else:
        results = run_suite(settings, path)
        path.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_docs:
        command = "python benchmarks/quality.py" + (" --quick" if args.quick else "") + \
                  (f" --steps {args.steps}" if args.steps else "")
        write_section("quality", quality_section(results, command))
        plot(results, path.parent.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
