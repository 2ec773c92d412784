"""Peak memory and step time at LLaMA-7B layer shapes, measured on 2 and 4 layers, extrapolated to 32.

Random-weight LlamaForCausalLM built from a config (no download): hidden 4096, FFN 11008, 32 heads
(32 KV heads), vocabulary 32000. Each (mode, layer count) runs in its own process, one at a time.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys

from docs_sections import DOCS, machine_line, save_results, write_section
from memory_at_scale_docs import plot, section
from memory_at_scale_setup import EXTRAPOLATE_TO, LAYER_COUNTS, LLAMA_7B_SHAPES, MODES, Mode
from rss import benchmark_parser, measured_training, run_worker


def build_model(layers: int, dtype: str):
    """A random-weight LLaMA with 7B layer shapes and ``layers`` decoder layers, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraprune.models.loading import parse_dtype

    config = LlamaConfig(**LLAMA_7B_SHAPES, num_hidden_layers=layers, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype)).eval()


def tensor_sizes(model, mode: Mode) -> dict[str, int]:
    """Bytes of the tensors whose size is known up front: frozen weights, ∇W, LoRA and its AdamW state."""
    from loraprune.models import spec_for
    from loraprune.pruning.groups import LayerShape

    lora = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    shape = LayerShape.from_config(model.config)
    projections = shape.hidden_size * shape.head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    projections += 3 * shape.hidden_size * shape.intermediate_size
    weight_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[mode.dtype]
    needs_gradients = mode.settings.get("criterion") == "grad"
    spec_for(model.config)
    return {"frozen_bytes": frozen, "lora_parameter_bytes": lora, "lora_gradient_bytes": lora,
            "adamw_state_bytes": 2 * lora,
            "weight_gradient_bytes": model.config.num_hidden_layers * projections * weight_bytes
            if needs_gradients else 0}


def _worker(name: str, layers: int, steps: int, seq_len: int) -> dict:
    """Run one mode at one layer count in this process; report its peak RSS and step times."""
    import torch

    from loraprune.config import PruneConfig
    from loraprune.pruning.masks import ModelMasks

    mode = MODES[name]
    model = build_model(layers, mode.dtype)
    if mode.base_bits is not None:
        from loraprune.models.quantised import quantise_frozen_base

        quantise_frozen_base(model, mode.base_bits)
    gc.collect()
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, LLAMA_7B_SHAPES["vocab_size"], (64, seq_len), generator=generator)
    config = PruneConfig(sparsity=0.5, steps=steps, seq_len=seq_len, prune_every=1, save_every=10 ** 9,
                         warmup_fraction=0.0, cooldown_fraction=0.0, dtype=mode.dtype,
                         **({"base_bits": mode.base_bits} if mode.base_bits else {}), **mode.settings)
    fixed = None if mode.prunes else ModelMasks.for_model(model)
    measured = measured_training(model, blocks, config, fixed, interval=0.01)
    return {"mode": name, "layers": layers, "dtype": mode.dtype, "base_bits": mode.base_bits, **measured.row(),
            "step_seconds": measured.step_seconds, "final_loss": measured.outcome.final_loss, "steps": steps,
            "seq_len": seq_len, "threads": torch.get_num_threads(), **tensor_sizes(measured.outcome.model, mode)}


def _free_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def measure(modes: list[str], steps: int, seq_len: int, rows: list[dict], save) -> list[dict]:
    """Run every (mode, layers) not yet in ``rows`` in a fresh process, one after another."""
    done = {(r["mode"], r["layers"]) for r in rows}
    for name, layers in itertools.product(modes, LAYER_COUNTS):  # a mode's two sizes together
        if (name, layers) in done:
            continue
        print(f"--- {name} × {layers} layers (available {_free_gib():.1f} GiB)", flush=True)
        command = ["nice", "-n", "5", sys.executable, __file__, "--worker", name, "--layers", str(layers),
                   "--steps", str(steps), "--seq-len", str(seq_len)]
        rows.append(run_worker(command, f"{name} × {layers}"))
        print({k: rows[-1][k] for k in ("mode", "layers", "peak_rss_bytes", "step_seconds_median")}, flush=True)
        save(rows)
    return rows


def extrapolate(rows: list[dict]) -> dict[str, dict]:
    """Per mode: per-layer slope of peak RSS (from 2 and 4 layers) and its value at 32 layers."""
    by_mode: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], {})[r["layers"]] = r
    fits = {}
    low, high = LAYER_COUNTS
    for name, at in by_mode.items():
        if low not in at or high not in at:
            continue
        fit = {}
        for key in ("peak_rss_bytes", "step_seconds_median"):
            slope = (at[high][key] - at[low][key]) / (high - low)
            fit[f"{key}_per_layer"] = slope
            fit[f"{key}_at_{EXTRAPOLATE_TO}"] = at[high][key] + slope * (EXTRAPOLATE_TO - high)
        fits[name] = fit
    return fits


def ratios(fits: dict[str, dict]) -> dict[str, dict]:
    """The ratios the issue's targets are stated in, at 32 layers."""
    pairs = {"lora_vs_grad": ("lora", "grad"), "fisher_vs_grad": ("fisher", "grad"),
             "lora_vs_finetune": ("lora", "finetune"), "fisher_vs_finetune": ("fisher", "finetune"),
             "lora+distill_vs_grad+distill": ("lora+distill", "grad+distill"),
             "fisher+distill_vs_finetune+distill": ("fisher+distill", "finetune+distill"),
             "lora@bf16_vs_grad@bf16": ("lora@bf16", "grad@bf16"),
             "fisher@bf16_vs_grad@bf16": ("fisher@bf16", "grad@bf16"),
             "lora@int8_vs_grad": ("lora@int8", "grad"), "fisher@int8_vs_grad": ("fisher@int8", "grad"),
             "lora@int8_vs_grad@bf16": ("lora@int8", "grad@bf16"),
             "fisher@int8_vs_grad@bf16": ("fisher@int8", "grad@bf16")}
    out = {}
    for label, (mode, reference) in pairs.items():
        if mode in fits and reference in fits:
            m, r = fits[mode], fits[reference]
            out[label] = {key: m[f"{key}_at_{EXTRAPOLATE_TO}"] / r[f"{key}_at_{EXTRAPOLATE_TO}"]
                          for key in ("peak_rss_bytes", "step_seconds_median")}
    return out


def step_time_ratios(rows: list[dict]) -> dict[str, float]:
    """Measured step-time ratios at the largest layer count (same run, side by side)."""
    high = {r["mode"]: r for r in rows if r["layers"] == LAYER_COUNTS[-1]}
    pairs = {"lora_vs_grad": ("lora", "grad"), "fisher_vs_grad": ("fisher", "grad"),
             "lora_vs_finetune": ("lora", "finetune"), "fisher_vs_finetune": ("fisher", "finetune"),
             "lora@bf16_vs_grad@bf16": ("lora@bf16", "grad@bf16"),
             "fisher@bf16_vs_grad@bf16": ("fisher@bf16", "grad@bf16")}
    return {label: high[m]["step_seconds_median"] / high[r]["step_seconds_median"]
            for label, (m, r) in pairs.items() if m in high and r in high}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.splitlines()[0], MODES, steps=4)
    parser.add_argument("--layers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.layers, args.steps, args.seq_len)))
        return 0
    saved = DOCS / "results" / "memory_at_scale.json"
    result = json.loads(saved.read_text()) if saved.exists() else {"rows": []}
    if not args.from_json:
        def save(rows: list[dict]) -> None:
            if not args.no_docs:
                save_results("memory_at_scale", {**result, "rows": rows})

        result["rows"] = measure(args.modes, args.steps, args.seq_len, result["rows"], save)
        result.setdefault("commands", []).append(
            f"nice -n 5 python benchmarks/memory_at_scale.py --modes {' '.join(args.modes)} "
            f"--steps {args.steps} --seq-len {args.seq_len}")
    result["extrapolated"] = extrapolate(result["rows"])
    result["ratios_at_32_layers"] = ratios(result["extrapolated"])
    result["step_time_ratios_at_4_layers"] = step_time_ratios(result["rows"])
    if args.no_docs:
        print(json.dumps({k: result[k] for k in ("ratios_at_32_layers", "step_time_ratios_at_4_layers")}, indent=1))
        return 0
    result.setdefault("machine", machine_line())
    save_results("memory_at_scale", result)
    commands = "`, then `".join(result.get("commands", []))
    write_section("memory_at_scale", section(result, commands, result["machine"]))
    plot(result, DOCS / "memory_at_scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
