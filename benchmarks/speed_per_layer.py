"""transformers speed of per-layer (DeciLM) models against uniform ones of the same size, SmolLM2 and 1B shape.

Prefill and decode (sdpa, KV cache) with `loraprune bench speed`'s timing code for dense, uniform
and global models at 20 % and 50 %. Which units are kept does not change speed, so the folders are
written by loraprune's own exporters from masks of known widths, without training: SmolLM2 with its
real weights (uniform: the target solver's widths; global: the per-layer widths of the quality
suite's global runs, docs/results/quality.json), the Llama-3.2-1B shape with random weights
(widths as benchmarks/speed_at_scale.py: global mapped from the SmolLM2 run and scaled to the
uniform model's parameter count), in bfloat16 so that dense and two pruned models fit in 8 GB.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_sections import RESULTS, save_results, write_section
from speed_at_scale import llama_config, model_widths, parameter_count

from loraprune.evaluation.speed import benchmark_speed
from loraprune.export import ExportRequest, export_model
from loraprune.export.slicing import LayerWidths
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask, ModelMasks

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ROOT / "runs" / "speed-per-layer"
SPARSITIES = (0.2, 0.5)


def masks_of(widths: list[LayerWidths], shape: LayerShape) -> ModelMasks:
    """Masks keeping the first KV groups and FFN channels: ``widths`` per layer."""
    layers = []
    for width in widths:
        heads = torch.zeros(shape.num_heads, dtype=torch.bool)
        heads[:width.kv_heads * shape.queries_per_kv] = True
        ffn = torch.zeros(shape.intermediate_size, dtype=torch.bool)
        ffn[:width.ffn] = True
        layers.append(LayerMask(heads, ffn))
    return ModelMasks(layers)


def smollm2_widths() -> dict[str, list[LayerWidths]]:
    """Uniform widths from the target solver and the global runs' per-layer widths, at each sparsity."""
    from loraprune.models.loading import load_model
    from loraprune.pruning.target import solve_target

    model, _ = load_model("smollm2-135m")
    shape, layers = LayerShape.from_config(model.config), model.config.num_hidden_layers
    runs = json.loads((RESULTS / "quality.json").read_text())["runs"]
    widths = {}
    for sparsity in SPARSITIES:
        target = solve_target(shape, layers, model.num_parameters(), sparsity, unit="kv_group")
        kv = shape.num_kv_heads - target.attention_units_removed
        widths[f"uniform-{sparsity}"] = [LayerWidths(kv * shape.queries_per_kv, kv,
                                                     shape.intermediate_size - target.ffn_channels_removed)] * layers
        kept = runs[f"fisher+global@{sparsity}"]["kept_per_layer"]
        widths[f"global-{sparsity}"] = [LayerWidths(k["heads"], k["heads"] // shape.queries_per_kv, k["ffn"])
                                        for k in kept]
    return widths


def smollm2_kept_parameters() -> dict[str, int]:
    """Parameters each SmolLM2 variant really keeps (no zero slots)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, num_hidden_layers=30)
    return {name: parameter_count(config, widths) for name, widths in smollm2_widths().items()}


def write_folders(name: str, build_model, tokenizer, widths: dict[str, list[LayerWidths]]) -> dict[str, Path]:
    """Export every pruned model of ``widths`` (plain Llama or DeciLM) from a fresh ``build_model()``."""
    folders = {}
    for variant, layer_widths in widths.items():
        out = FOLDERS / name / variant
        if not (out / "config.json").exists():
            model = build_model()
            shape = LayerShape.from_config(model.config)
            masks = masks_of(layer_widths, shape)
            probe = torch.arange(64)[None] % model.config.vocab_size
            # transformers: a plain Llama folder for one width, else the DeciLM folder.
            export_model(ExportRequest(model, masks, tokenizer, {"benchmark": "speed_per_layer"}, out,
                                       overwrite=True, probe=probe))
            del model
            gc.collect()
        folders[variant] = out
    return folders


def smollm2_result(repeats: int, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    from loraprune.models.loading import load_model, resolve_model_dir

    _, tokenizer = load_model("smollm2-135m")
    folders = write_folders("smollm2", lambda: load_model("smollm2-135m")[0], tokenizer, smollm2_widths())
    return benchmark_speed(resolve_model_dir("smollm2-135m"), list(folders.values()), prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, repeats=repeats, threads=threads)


def llama_1b_result(repeats: int, prompt_tokens: int, new_tokens: int, threads: int) -> list[dict]:
    """Dense and the two models of one sparsity per run (bfloat16): three models fit in memory."""
    from transformers import AutoModelForCausalLM

    from loraprune.models.loading import load_model

    _, tokenizer = load_model("smollm2-135m")  # ids < 49,152; the 128,256-row embedding is what is timed
    def build_model():  # a fresh config each time: exporting slices the model, and its config, in place
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(llama_config("llama-3.2-1b"), dtype=torch.bfloat16).eval()

    widths = model_widths("llama-3.2-1b", as_deci=False)
    dense = FOLDERS / "llama-3.2-1b" / "dense"
    if not (dense / "config.json").exists():
        build_model().save_pretrained(dense)
        tokenizer.save_pretrained(dense)
    pruned = write_folders("llama-3.2-1b", build_model, tokenizer, {k: v for k, v in widths.items() if k != "dense"})
    return [benchmark_speed(dense, [pruned[f"uniform-{s}"], pruned[f"global-{s}"]], prompt_tokens=prompt_tokens,
                            new_tokens=new_tokens, repeats=repeats, threads=threads, dtype=torch.bfloat16)
            for s in SPARSITIES]


def table(results: list[dict]) -> list[str]:
    lines = [("| model | class | params | prefill ms | prefill speed-up (FLOP ideal) | decode tok/s | "
             "decode speed-up (byte ideal) | decode / byte ideal |"), "|---|---|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        dense = result["models"][0]
        if result is results[0]:
            lines.append(f"| dense | {dense['architecture']} | {dense['parameters'] / 1e6:.1f} M "
                         f"| {dense['prefill_seconds_median'] * 1000:.0f} | 1.00 | "
                         f"{dense['decode_tokens_per_second_median']:.2f} | 1.00 | |")
        for model, c in zip(result["models"][1:], result["comparisons"]):
            lines.append(f"| {model['name']} | {model['architecture']} | {model['parameters'] / 1e6:.1f} M "
                         f"| {model['prefill_seconds_median'] * 1000:.0f} "
                         f"| {c['prefill_speedup']:.2f} ({c['prefill_ideal_flops']:.2f}) "
                         f"| {model['decode_tokens_per_second_median']:.2f} "
                         f"| {c['decode_speedup']:.2f} ({c['decode_ideal_bytes']:.2f}) "
                         f"| {c['decode_speedup'] / c['decode_ideal_bytes']:.2f} |")
    return lines


def per_layer_cost(result: dict, kept_parameters: dict[str, int]) -> str:
    """Global (DeciLM) against uniform at each sparsity: speed ratios, and stored against kept parameters."""
    rows = {row["name"]: row for row in result["models"]}
    ideals = {c["pruned"]: c for c in result["comparisons"]}
    sentences = []
    for sparsity in SPARSITIES:
        uniform, globally = rows.get(f"uniform-{sparsity}"), rows.get(f"global-{sparsity}")
        if not (uniform and globally):
            continue
        u, g = ideals[uniform["name"]], ideals[globally["name"]]
        sentences.append(
            f"at {sparsity:.0%}, global (DeciLM) decodes at "
            f"{globally['decode_tokens_per_second_median'] / uniform['decode_tokens_per_second_median']:.2f}× and "
            f"prefills at {uniform['prefill_seconds_median'] / globally['prefill_seconds_median']:.2f}× the speed of "
            f"uniform, while its ideal speed-ups (bytes, FLOPs) are {g['decode_ideal_bytes'] / u['decode_ideal_bytes']:.2f}× "
            f"and {g['prefill_ideal_flops'] / u['prefill_ideal_flops']:.2f}× uniform's: it keeps "
            f"{kept_parameters[globally['name']] / 1e6:.1f} M parameters but stores {globally['parameters'] / 1e6:.1f} M "
            f"(uniform: {uniform['parameters'] / 1e6:.1f} M)")
    if not sentences:
        return ""
    return ("Per-layer against uniform at the same parameter count: " + "; ".join(sentences) + ". Why: the "
            "DeciLM format has one query-head count for all layers, so a layer that keeps fewer KV groups than "
            "the widest layer stores zero query slots (and zero KV heads where the group size must divide the "
            "head count); q/k/v/o run at the widest layer's size and the zero slots cost bytes and FLOPs like "
            "real weights. Global allocation also keeps more attention (which also scales with the context) "
            "where uniform keeps more FFN. The ratios are medians of alternated repeats.")


def section(results: dict) -> str:
    smol = results["smollm2"]
    m, s = smol["machine"], smol["settings"]
    lines = ["## Speed of per-layer (DeciLM) models in transformers", "",
             (f"Command: `python benchmarks/speed_per_layer.py`. {m['cpu']}, {m['logical_cores']} logical cores "
              f"(load average {m['load_average_before']} before, "
              f"{m['load_average_after']} after), torch {m['torch']} ({m['torch_threads']} threads), "
              f"transformers {m['transformers']}, sdpa attention, KV cache, batch 1. Prefill "
              f"{s['prompt_tokens']} tokens, decode {s['new_tokens']} tokens, models alternated inside each of "
              f"{s['repeats']} repeats, medians. Uniform models are plain Llama folders, global ones DeciLM "
              "folders with loraprune's shipped modeling code, both written by loraprune's exporters from masks "
              "of the stated widths (speed does not depend on which units are kept)."),
             "", "### SmolLM2-135M (real weights, float32)", "", *table([smol])]
    lines += ["", per_layer_cost(smol, results.get("smollm2_kept_parameters") or smollm2_kept_parameters())]
    if "llama-3.2-1b" in results:
        kept = {name: parameter_count(llama_config("llama-3.2-1b"), widths)
                for name, widths in model_widths("llama-3.2-1b").items()}
        first, last = results["llama-3.2-1b"][0], results["llama-3.2-1b"][-1]
        lines += ["", "### Llama-3.2-1B shape (random weights, bfloat16; dense and one sparsity per run)", "",
                  (f"Its runs: torch {first['machine']['torch_threads']} threads, load average "
                   f"{first['machine']['load_average_before']} before, {last['machine']['load_average_after']} after; "
                   f"prefill {first['settings']['prompt_tokens']} tokens, decode {first['settings']['new_tokens']} "
                   f"tokens, {first['settings']['repeats']} alternated repeats."), "",
                  *table(results["llama-3.2-1b"]), "",
                  per_layer_cost({key: [item for result in results["llama-3.2-1b"] for item in result[key]]
                                  for key in ("models", "comparisons")}, kept)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-1b", action="store_true", help="SmolLM2 only")
    parser.add_argument("--skip-smollm2", action="store_true", help="the 1B shape only (SmolLM2's saved results stay)")
    parser.add_argument("--from-json", action="store_true", help="rewrite the docs from saved results, no runs")
    args = parser.parse_args(argv)
    path = RESULTS / "speed_per_layer.json"
    if args.from_json:
        results = json.loads(path.read_text())
    else:
        timing = (args.repeats, args.prompt_tokens, args.new_tokens, args.threads)
        results = json.loads(path.read_text()) if args.skip_smollm2 else {
            "smollm2": smollm2_result(*timing), "smollm2_kept_parameters": smollm2_kept_parameters()}
        save_results("speed_per_layer", results)
        if not args.skip_1b:
            results["llama-3.2-1b"] = llama_1b_result(*timing)
            save_results("speed_per_layer", results)
    write_section("speed_per_layer", section(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
