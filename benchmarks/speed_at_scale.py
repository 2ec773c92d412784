"""llama.cpp speed of pruned models at the shapes users prune: Llama-3.2-1B (and Llama-3.1-8B), f16 and Q4_K_M.

Weights are random (speed depends on shapes, not values). Each model is written as GGUF through
loraprune's writer (f16, tensor by tensor, so the whole model is never in memory) and quantised with
llama.cpp's own quantizer. Widths: uniform (loraprune's target solver, KV groups and FFN channels
rounded to 256) and "global" (the per-layer widths a global SmolLM2 run chose, read from
docs/results/quality.json, mapped onto the layers proportionally, with the FFN widths scaled until
the model has the uniform one's parameter count). Models are timed alternately, median of repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_sections import RESULTS, save_results, write_section

from loraprune.evaluation.llamacpp_speed import _benchmark
from loraprune.export.gguf_types import quantize_gguf
from loraprune.export.gguf_writer import write_gguf
from loraprune.export.slicing import LayerWidths
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.target import solve_target

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "runs" / "speed-at-scale"
SHAPES = {  # the published configs' shapes
    "llama-3.2-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "llama-3.1-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
                     "tie_word_embeddings": False},
}
SPARSITIES = (0.2, 0.5)
ROUND_TO = 256  # K-quant blocks: down_proj's rows are the FFN width
SMOLLM2_RUNS = {0.2: "fisher+global@0.2", 0.5: "fisher+global@0.5"}  # in docs/results/quality.json
SMOLLM2 = LayerShape(576, 9, 3, 64, 1536)
AS_DECI = "-as-deci"


def llama_config(shape: str):
    """A transformers LlamaConfig of the named shape (no weights)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}, _name_or_path=shape)


def parameter_count(config, widths: list[LayerWidths]) -> int:
    """Parameters of a Llama with these per-layer widths (tied embeddings counted once)."""
    shape = LayerShape.from_config(config)
    hidden, head_dim = shape.hidden_size, shape.head_dim
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    layers = sum(2 * hidden + head_dim * hidden * 2 * (w.heads + w.kv_heads) + 3 * hidden * w.ffn for w in widths)
    return embeddings + hidden + layers


def uniform_widths(config, sparsity: float) -> list[LayerWidths]:
    """The widths loraprune's uniform target gives at this whole-model sparsity (KV groups, round-to 256)."""
    shape = LayerShape.from_config(config)
    dense = [LayerWidths(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)] * config.num_hidden_layers
    target = solve_target(shape, config.num_hidden_layers, parameter_count(config, dense), sparsity,
                          unit="kv_group", round_to=ROUND_TO)
    kv = shape.num_kv_heads - target.attention_units_removed
    return [LayerWidths(kv * shape.queries_per_kv, kv, shape.intermediate_size - target.ffn_channels_removed)
            ] * config.num_hidden_layers


def global_widths(config, sparsity: float, parameters: int) -> list[LayerWidths]:
    """A SmolLM2 global run's per-layer widths, mapped onto this model, FFN scaled to ``parameters``."""
    shape = LayerShape.from_config(config)
    kept = json.loads((RESULTS / "quality.json").read_text())["runs"][SMOLLM2_RUNS[sparsity]]["kept_per_layer"]
    layers = config.num_hidden_layers
    source = [kept[round(i * (len(kept) - 1) / (layers - 1))] for i in range(layers)]
    kv = [round(k["heads"] / SMOLLM2.num_heads * shape.num_kv_heads) for k in source]
    kv = [max(1, n) if k["heads"] else 0 for n, k in zip(kv, source)]
    ffn_fraction = [k["ffn"] / SMOLLM2.intermediate_size for k in source]

    def widths(scale: float) -> list[LayerWidths]:
        ffn = [min(shape.intermediate_size, max(ROUND_TO, round(scale * f * shape.intermediate_size / ROUND_TO)
                                                * ROUND_TO)) if f else 0 for f in ffn_fraction]
        return [LayerWidths(n * shape.queries_per_kv, n, w) for n, w in zip(kv, ffn)]

    low, high = 0.0, 1.0 / min(f for f in ffn_fraction if f)
    for _ in range(40):  # bisection on the FFN scale: the closest parameter count
        middle = (low + high) / 2
        low, high = (middle, high) if parameter_count(config, widths(middle)) < parameters else (low, middle)
    return min((widths(low), widths(high)), key=lambda w: abs(parameter_count(config, w) - parameters))


def random_tensors(config, widths: list[LayerWidths], seed: int = 0):
    """(GGUF name, float32 array) of a random Llama with these widths, one tensor at a time."""
    rng = np.random.default_rng(seed)
    hidden, head_dim = config.hidden_size, config.head_dim
    # Drawing a billion normals is minutes on a busy CPU; windows of one pool of 2^24 are as good here.
    pool = rng.standard_normal(2**24 + hidden * 64, dtype=np.float32) * np.float32(0.02)

    def weight(rows: int, columns: int) -> np.ndarray:
        flat = np.empty(rows * columns, dtype=np.float32)
        for start in range(0, flat.size, 2**24):
            offset = int(rng.integers(0, hidden * 64))
            chunk = flat[start:start + 2**24]
            chunk[:] = pool[offset:offset + chunk.size]
        return flat.reshape(rows, columns)

    yield "token_embd.weight", weight(config.vocab_size, hidden)
    for index, width in enumerate(widths):
        prefix = f"blk.{index}"
        yield f"{prefix}.attn_norm.weight", np.ones(hidden, dtype=np.float32)
        yield f"{prefix}.attn_q.weight", weight(width.heads * head_dim, hidden)
        yield f"{prefix}.attn_k.weight", weight(width.kv_heads * head_dim, hidden)
        yield f"{prefix}.attn_v.weight", weight(width.kv_heads * head_dim, hidden)
        yield f"{prefix}.attn_output.weight", weight(hidden, width.heads * head_dim)
        yield f"{prefix}.ffn_norm.weight", np.ones(hidden, dtype=np.float32)
        yield f"{prefix}.ffn_gate.weight", weight(width.ffn, hidden)
        yield f"{prefix}.ffn_up.weight", weight(width.ffn, hidden)
        yield f"{prefix}.ffn_down.weight", weight(hidden, width.ffn)
    yield "output_norm.weight", np.ones(hidden, dtype=np.float32)
    if not config.tie_word_embeddings:
        yield "output.weight", weight(config.vocab_size, hidden)


def model_widths(shape: str, sparsities: tuple[float, ...] = SPARSITIES) -> dict[str, list[LayerWidths]]:
    """name -> per-layer widths: dense, then uniform and global at each sparsity."""
    config = llama_config(shape)
    dense = LayerShape.from_config(config)
    models = {"dense": [LayerWidths(dense.num_heads, dense.num_kv_heads, dense.intermediate_size)]
              * config.num_hidden_layers}
    for sparsity in sparsities:
        uniform = uniform_widths(config, sparsity)
        models[f"uniform-{sparsity}"] = uniform
        models[f"global-{sparsity}"] = global_widths(config, sparsity, parameter_count(config, uniform))
    # The uniform widths written as a `deci` file: what llama.cpp's per-layer graph costs by itself.
    models[f"uniform-{sparsities[-1]}{AS_DECI}"] = models[f"uniform-{sparsities[-1]}"]
    return models


def build_files(shape: str, gguf_types: list[str], tokenizer, quantised: set[str] | None = None,
                sparsities: tuple[float, ...] = SPARSITIES) -> dict[str, dict[str, Path]]:
    """Write (or reuse) every model of the shape in f16, then quantise ``quantised`` (default: all) to the
    other types: {type: {name: path}}."""
    config = llama_config(shape)
    f16 = {}
    for name, widths in model_widths(shape, sparsities).items():
        f16[name] = FILES / shape / f"{name}-f16.gguf"
        if not f16[name].exists():
            f16[name].parent.mkdir(parents=True, exist_ok=True)
            partial = f16[name].with_suffix(".partial")
            architecture = "llama" if len(set(widths)) == 1 and not name.endswith(AS_DECI) else "deci"
            write_gguf(partial, config, widths, architecture, "f16", tokenizer, None, random_tensors(config, widths))
            partial.rename(f16[name])
    files: dict[str, dict[str, Path]] = {"f16": f16}
    for gguf_type in (t for t in gguf_types if t != "f16"):
        files[gguf_type] = {}
        for name, source in f16.items():
            path = FILES / shape / f"{name}-{gguf_type}.gguf"
            if not path.exists() and (quantised is None or name in quantised):
                quantize_gguf(source, path, gguf_type)
            if path.exists():
                files[gguf_type][name] = path
    return files


def measure(files: dict[str, Path], groups: list[list[str]], prompt_tokens: int, new_tokens: int,
            repeats: int, threads: int) -> list[dict]:
    """Time each group of models (dense first) alternately in llama.cpp; one result per group."""
    return [_benchmark({name: files[name] for name in group}, prompt_tokens, new_tokens, repeats, threads)
            for group in groups]


def fixed_cost_fit(rows: list[dict]) -> dict:
    """Least squares over the files: decode ms/token = fixed + weight bytes / bandwidth."""
    bytes_read = np.array([r["weight_bytes"] for r in rows], dtype=np.float64)
    ms = np.array([1000 / r["decode_tokens_per_second_median"] for r in rows])
    slope, fixed = np.polyfit(bytes_read, ms, 1)
    return {"fixed_ms_per_token": float(fixed), "bandwidth_gb_per_s": float(1e-6 / slope) if slope > 0 else None}


def run(shapes: list[str], gguf_types: list[str], prompt_tokens: int, new_tokens: int, repeats: int,
        threads: int, grouped: bool, quantised: set[str] | None = None,
        sparsities: tuple[float, ...] = SPARSITIES) -> dict:
    """Build and time every shape and type; the whole result."""
    from transformers import AutoTokenizer

    from loraprune.models.loading import builtin_gguf_path

    gguf = builtin_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # padded to 128,256 ids
    results = {"uptime_before": _uptime(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
                            "threads": threads, "round_to": ROUND_TO, "sparsities": list(sparsities),
                            "smollm2_runs": {s: SMOLLM2_RUNS[s] for s in sparsities}},
               "shapes": {}}
    for shape in shapes:
        config = llama_config(shape)
        widths = model_widths(shape, sparsities)
        files = build_files(shape, gguf_types, tokenizer, quantised, sparsities)
        names = list(widths)
        # Six f16 files of a 1B shape map ~10 GB; in two groups one run stays under ~7 GB.
        groups = ([["dense", f"uniform-{s}", f"global-{s}"] for s in sparsities] if grouped else [names])
        groups[-1] += [name for name in names if name.endswith(AS_DECI)]
        shape_result = {"config": SHAPES[shape], "widths": {n: [w._asdict() for w in ws] for n, ws in widths.items()},
                        "parameters": {n: parameter_count(config, ws) for n, ws in widths.items()}, "types": {}}
        for gguf_type in gguf_types:
            present = [[name for name in group if name in files[gguf_type]] for group in groups]
            timed = measure(files[gguf_type], [g for g in present if len(g) > 1], prompt_tokens, new_tokens,
                            repeats, threads)
            rows = {row["name"]: row for group in timed for row in group["models"]}
            shape_result["types"][gguf_type] = {"groups": timed, "fit": fixed_cost_fit(list(rows.values()))}
        results["shapes"][shape] = shape_result
    results["uptime_after"] = _uptime()
    return results


def _uptime() -> str:
    return os.popen("uptime").read().strip()


def section(results: dict) -> str:
    """Markdown: per shape and type, speed-ups against dense and their ideals."""
    s = results["settings"]
    machine = next(iter(next(iter(results["shapes"].values()))["types"].values()))["groups"][0]["machine"]
    lines = [
        f"## Speed at real Llama shapes in llama.cpp ({', '.join(results['shapes'])})",
        "",
        (f"Command: `python benchmarks/speed_at_scale.py` ({results['started']}). Random weights (speed depends "
         "on shapes, not values) in the shapes of the published configs; each model written as GGUF by "
         "loraprune's writer (f16, `deci` architecture for per-layer widths) and quantised by llama.cpp's own "
         "quantizer. Uniform: loraprune's target solver (KV groups, FFN rounded to 256). Global: the per-layer "
         f"widths of the SmolLM2 runs {', '.join(s['smollm2_runs'].values())} (docs/results/quality.json), "
         "mapped onto the layers proportionally, FFN widths scaled (multiples of 256) to the uniform model's "
         "parameter count: the two differ only in how widths are spread over layers."),
        "",
        (f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, shared with four other jobs: "
         f"`uptime` before: {results['uptime_before']}; after: {results['uptime_after']}. llama.cpp through "
         f"xllamacpp, {s['threads']} threads, f32 KV cache. Prefill {s['prompt_tokens']} tokens, decode "
         f"{s['new_tokens']} tokens; dense and the two models of one sparsity alternate inside each of "
         f"{s['repeats']} repeats, medians. Ideals are counted from the files: linear FLOPs per token "
         "(prefill) and weight bytes a decode step reads (decode)."),
    ]
    for shape, shape_result in results["shapes"].items():
        for gguf_type, typed in shape_result["types"].items():
            lines += ["", f"### {shape}, {gguf_type}", "",
                      ("| model | arch | params | weight MiB | prefill tok/s | prefill speed-up (FLOP ideal) | "
                       "prefill / ideal | decode tok/s | decode speed-up (byte ideal) | decode / ideal |"),
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for group in typed["groups"]:
                dense = group["models"][0]
                if group is typed["groups"][0]:
                    lines.append(f"| dense | {dense['architecture']} | {shape_result['parameters']['dense'] / 1e9:.2f} B "
                                 f"| {dense['weight_bytes'] / 2**20:.0f} | {dense['prefill_tokens_per_second_median']:.1f} "
                                 f"| 1.00 | | {dense['decode_tokens_per_second_median']:.2f} | 1.00 | |")
                for model, c in zip(group["models"][1:], group["comparisons"]):
                    prefill_fraction = c["prefill_speedup"] / c["prefill_ideal_flops"]
                    lines.append(
                        f"| {model['name']} | {model['architecture']} "
                        f"| {shape_result['parameters'][model['name']] / 1e9:.2f} B | {model['weight_bytes'] / 2**20:.0f} "
                        f"| {model['prefill_tokens_per_second_median']:.1f} "
                        f"| {c['prefill_speedup']:.2f} ({c['prefill_ideal_flops']:.2f}) | {prefill_fraction:.2f} "
                        f"| {model['decode_tokens_per_second_median']:.2f} "
                        f"| {c['decode_speedup']:.2f} ({c['decode_ideal_bytes']:.2f}) "
                        f"| {c['decode_fraction_of_ideal_bytes']:.2f} |")
            fit = typed["fit"]
            if fit["bandwidth_gb_per_s"]:
                lines += ["", (f"Decode time per token against weight bytes, least squares over these files: "
                               f"{fit['fixed_ms_per_token']:.1f} ms fixed + bytes / {fit['bandwidth_gb_per_s']:.1f} GB/s.")]
    timed = ", ".join(f"{x:.0%}" for x in s.get("sparsities", SPARSITIES))
    lines += ["", targets(results), "", where_time_goes(results), "",
              (f"Timed in this run: {', '.join(results['shapes'])} at {timed}. Not timed: the other sparsities and "
               "shapes the script knows (`--sparsities 0.2,0.5 --shapes llama-3.2-1b,llama-3.1-8b`): on this shared "
               "machine writing and quantising one 1B-shape file took 3–8 minutes.")]
    return "\n".join(lines)


def where_time_goes(results: dict) -> str:
    """The deci graph against the llama graph on the same tensors, and the fixed cost per decoded token."""
    sentences = []
    last = results["settings"].get("sparsities", SPARSITIES)[-1]
    for shape, shape_result in results["shapes"].items():
        for gguf_type, typed in shape_result["types"].items():
            rows = {row["name"]: row for group in typed["groups"] for row in group["models"]}
            decode = {name: row["decode_tokens_per_second_median"] for name, row in rows.items()}
            prefill = {name: row["prefill_tokens_per_second_median"] for name, row in rows.items()}
            uniform, as_deci, per_layer = f"uniform-{last}", f"uniform-{last}{AS_DECI}", f"global-{last}"
            if uniform in rows and as_deci in rows:
                sentences.append(
                    f"{shape}, {gguf_type}: the uniform {last:.0%} tensors written as a `deci` file decode at "
                    f"{decode[as_deci] / decode[uniform]:.2f}× and prefill at {prefill[as_deci] / prefill[uniform]:.2f}× "
                    "the same tensors as `llama` (the per-layer graph's own cost, one run of alternated repeats).")
            if uniform in rows and per_layer in rows:
                fit = typed["fit"]
                sentences.append(
                    f"{shape}, {gguf_type}: global {last:.0%} (same parameter count, other widths per layer) decodes "
                    f"at {decode[per_layer] / decode[uniform]:.2f}× and prefills at "
                    f"{prefill[per_layer] / prefill[uniform]:.2f}× uniform {last:.0%}; the fitted fixed cost "
                    f"({fit['fixed_ms_per_token']:.1f} ms a token, which does not shrink with the widths) is "
                    f"{fit['fixed_ms_per_token'] / (1000 / decode[per_layer]):.0%} of its decode step, which is what "
                    "keeps decode below the byte ideal.")
    above = [f"{shape} {t}" for shape, r in results["shapes"].items() for t, typed in r["types"].items()
             for g in typed["groups"] for c in g["comparisons"] if c["prefill_speedup"] > 1.1 * c["prefill_ideal_flops"]]
    if above:
        sentences.append(
            f"Prefill speed-ups above the FLOP ideal ({', '.join(sorted(set(above)))}) mean that prefill of this "
            f"short prompt is not FLOP-bound on this machine: with "
            f"{results['settings']['prompt_tokens']} tokens each weight is read once per prompt, and memory "
            "bandwidth and caches are shared with four other jobs, so smaller files gain more than their FLOPs. "
            "The prefill target is met, but these ratios do not show prefill scaling with FLOPs.")
    return " ".join(sentences)


def targets(results: dict) -> str:
    """The issue's targets at the 1B shape for the 50 % global model, met or missed and by how much."""
    shape = results["shapes"].get("llama-3.2-1b")
    if not shape:
        return ""
    sentences = []
    for gguf_type, typed in shape["types"].items():
        for group in typed["groups"]:
            for model, c in zip(group["models"][1:], group["comparisons"]):
                if model["name"] != "global-0.5":
                    continue
                decode, prefill = c["decode_fraction_of_ideal_bytes"], c["prefill_speedup"] / c["prefill_ideal_flops"]
                sentences.append(f"{gguf_type}: decode {decode:.2f}× the byte ideal (target 0.9: "
                                 + ("met" if decode >= 0.9 else f"missed by {0.9 - decode:.2f}")
                                 + f"), prefill {prefill:.2f}× the FLOP ideal (target 0.85: "
                                 + ("met" if prefill >= 0.85 else f"missed by {0.85 - prefill:.2f}") + ")")
    return "Targets at the 1B shape, 50 % global: " + "; ".join(sentences) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-3.2-1b", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--types", default="f16,q4_k_m", help="GGUF types to time")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma-separated")
    parser.add_argument("--quantise", default=None,
                        help="comma-separated model names to quantise (default: all; f16 files are always written)")
    parser.add_argument("--all-at-once", action="store_true", help="time all five models in one group")
    parser.add_argument("--from-json", action="store_true", help="rewrite the docs from saved results, no runs")
    parser.add_argument("--widths", action="store_true", help="print the widths of every model and exit")
    args = parser.parse_args(argv)
    if args.widths:
        for shape in args.shapes.split(","):
            config = llama_config(shape)
            for name, widths in model_widths(shape).items():
                print(shape, name, f"{parameter_count(config, widths):,}",
                      [(w.heads, w.kv_heads, w.ffn) for w in widths])
        return 0
    path = RESULTS / "speed_at_scale.json"
    if args.from_json:
        results = json.loads(path.read_text())
    else:
        results = run(args.shapes.split(","), args.types.split(","), args.prompt_tokens, args.new_tokens,
                      args.repeats, args.threads, grouped=not args.all_at_once,
                      quantised=set(args.quantise.split(",")) if args.quantise else None,
                      sparsities=tuple(float(s) for s in args.sparsities.split(",")))
        save_results("speed_at_scale", results)
    write_section("speed_at_scale", section(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
