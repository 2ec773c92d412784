"""How far the LoRA-memory criteria agree with the true-gradient one (paper Fig. 4).

One calibration batch; one-shot masks from the ``lora``, ``fisher`` and ``grad`` criteria at each
sparsity, every criterion scoring rows and columns alike; overlap = intersection over union of the
removed units (query heads and FFN channels) of each LoRA-memory criterion with ``grad``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from loraprune.config import PruneConfig
from loraprune.data import load_text, token_blocks
from loraprune.models.loading import load_model
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.target import solve_model_target
from loraprune.training.oneshot import calibration_scores, masks_from_scores

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def removed_overlap(a, b) -> dict[str, float]:
    """IoU of the removed query heads and of the removed FFN channels of two ModelMasks."""
    def iou(x: torch.Tensor, y: torch.Tensor) -> float:
        union = (x | y).sum().item()
        return (x & y).sum().item() / union if union else 1.0
    heads_a = torch.cat([~m.heads for m in a.layers])
    heads_b = torch.cat([~m.heads for m in b.layers])
    ffn_a = torch.cat([~m.ffn for m in a.layers])
    ffn_b = torch.cat([~m.ffn for m in b.layers])
    return {"heads": iou(heads_a, heads_b), "ffn": iou(ffn_a, ffn_b)}


COMPARED = ("lora", "fisher")  # each against grad


def measure(blocks: int, seq_len: int, seed: int = 0) -> dict:
    """Overlap of one-shot lora/fisher masks with grad's at each sparsity, from one calibration batch."""
    model, tokenizer = load_model("smollm2-135m")
    calibration = token_blocks(tokenizer, load_text("austen", "train"), seq_len)
    calibration = calibration[torch.randperm(len(calibration), generator=torch.Generator().manual_seed(seed))[:blocks]]
    shape = LayerShape.from_config(model.config)
    scores = {}
    for criterion in (*COMPARED, "grad"):
        config = PruneConfig(criterion=criterion, sparsity=SPARSITIES[0], seed=seed)
        scores[criterion] = calibration_scores(model, calibration, config, solve_model_target(model, config))
    rows = []
    for sparsity in SPARSITIES:
        target = solve_model_target(model, PruneConfig(sparsity=sparsity))
        masks = {c: masks_from_scores(s, shape, model.config.num_hidden_layers, target) for c, s in scores.items()}
        row = {"sparsity": sparsity, "achieved_sparsity": target.achieved_sparsity}
        for criterion in COMPARED:
            overlap = removed_overlap(masks[criterion], masks["grad"])
            row.update({f"{criterion}_heads": overlap["heads"], f"{criterion}_ffn": overlap["ffn"]})
        rows.append(row)
        print(rows[-1], flush=True)
    return {"calibration_blocks": blocks, "seq_len": seq_len, "seed": seed, "rows": rows}


def agreement_section(result: dict, command: str, machine: str) -> str:
    """Markdown table of mask overlap per sparsity."""
    lines = [
        "## Mask agreement: LoRA-memory criteria vs true-gradient importance",
        "",
        f"Command: `{command}`. Machine: {machine}.",
        "",
        (f"One calibration batch of {result['calibration_blocks']} × {result['seq_len']} tokens from the Austen "
        "training split. The `lora` criterion scores with fresh adapters (B = 0, so G = ∇B·A), `fisher` "
        "with the mask gradient of each unit, `grad` with the true ∇W; all three sum a unit's rows and "
        "columns (q/k/v/gate/up rows, o/down columns), so the groupings are alike. One-shot masks at each "
        "whole-model sparsity; overlap is intersection over union of the removed query heads and of the "
        "removed FFN channels, each criterion against `grad`."),
        "",
        "| sparsity | lora: heads IoU | lora: FFN IoU | fisher: heads IoU | fisher: FFN IoU |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['sparsity']:.1f} | {r['lora_heads']:.3f} | {r['lora_ffn']:.3f} | "
                     f"{r['fisher_heads']:.3f} | {r['fisher_ffn']:.3f} |")
    lines += ["", "![mask overlap](agreement.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Overlap vs sparsity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for criterion in COMPARED:
        for unit, style in (("heads", "o-"), ("ffn", "s--")):
            ax.plot([r["sparsity"] for r in rows], [r[f"{criterion}_{unit}"] for r in rows], style,
                    label=f"{criterion}: {'query heads' if unit == 'heads' else 'FFN channels'}")
    ax.set(xlabel="whole-model sparsity", ylabel="IoU of removed units with grad's", ylim=(0, 1.02),
           title="one-shot masks vs grad's")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.blocks, args.seq_len)
    if not args.no_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from docs_sections import DOCS, machine_line, save_results, write_section

        machine = machine_line()
        result["machine"] = machine
        save_results("agreement", result)
        write_section("agreement", agreement_section(
            result, f"python benchmarks/agreement.py --blocks {args.blocks} --seq-len {args.seq_len}", machine))
        plot(result, DOCS / "agreement.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
