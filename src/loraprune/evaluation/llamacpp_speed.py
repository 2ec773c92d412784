"""Measured prefill and decode speed of dense vs pruned GGUF files in llama.cpp, next to the ideal ratios.

llama.cpp reports its own prompt and generation timings; the ideal ratios are counted from the
files: weight bytes a decode step reads, and multiply-adds of the linear layers per token.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import torch
from gguf import LlamaFileType

from loraprune.errors import LoraPruneError
from loraprune.evaluation.speed import _load_average, machine_info
from loraprune.export.gguf_header import GGUFHeader, read_gguf
from loraprune.export.gguf_types import GGUF_TYPES
from loraprune.export.llamacpp import LlamaCpp


def benchmark_gguf_speed(dense: str | Path, pruned: list[str | Path], prompt_tokens: int = 512,
                         new_tokens: int = 128, repeats: int = 5, threads: int | None = None) -> dict:
    """Time the dense and every pruned GGUF in llama.cpp, alternating inside each repeat, median kept.

    ``dense`` is a .gguf file, or a model name / folder that is first written as a dense GGUF of the
    pruned files' weight type.
    """
    if repeats < 1 or prompt_tokens < 1 or new_tokens < 2:
        raise LoraPruneError("need --repeats >= 1, --prompt-tokens >= 1 and --new-tokens >= 2")
    files = [gguf_file(p) for p in pruned]
    with tempfile.TemporaryDirectory(prefix="loraprune-dense-gguf-") as scratch:
        dense_file = Path(dense) if str(dense).endswith(".gguf") else write_dense_gguf(
            str(dense), gguf_type_of(files[0]), Path(scratch) / "dense")
        return _benchmark({"dense": gguf_file(dense_file), **_names(files)}, prompt_tokens, new_tokens,
                          repeats, threads or os.cpu_count() or 1)


def _benchmark(files: dict[str, Path], prompt_tokens: int, new_tokens: int, repeats: int, threads: int) -> dict:
    load_before = _load_average()
    stats = {name: file_stats(path) for name, path in files.items()}
    vocab = min(s["vocab_size"] for s in stats.values())
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    runtimes = {name: LlamaCpp(path, context=prompt_tokens + new_tokens + 16, threads=threads)
                for name, path in files.items()}
    try:
        for runtime in runtimes.values():  # warm-up: page in the weights, start the thread pool
            runtime.greedy(prompt[:16], 4)
        prefill = {name: [] for name in files}
        decode = {name: [] for name in files}
        for _ in range(repeats):
            for name, runtime in runtimes.items():  # alternate so drift hits every model alike
                run = runtime.greedy(prompt, new_tokens)
                prefill[name].append(run.prefill_tokens_per_second)
                decode[name].append(run.decode_tokens_per_second)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    rows = [{"name": name, "path": str(path), **stats[name], "prefill_tokens_per_second": prefill[name],
             "prefill_tokens_per_second_median": statistics.median(prefill[name]),
             "decode_tokens_per_second": decode[name],
             "decode_tokens_per_second_median": statistics.median(decode[name])} for name, path in files.items()]
    return {"runtime": "llama.cpp (xllamacpp), f32 KV cache, flash attention off", "machine": machine_info(),
            "threads": threads, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
            "load_average_before": load_before, "load_average_after": _load_average(), "models": rows,
            "comparisons": [_compare(rows[0], row) for row in rows[1:]]}


def file_stats(path: Path) -> dict:
    """Architecture, weight type, bytes a decode step reads and linear multiply-adds per token."""
    reader = read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    # Decode reads every weight once per token; the embedding table only as one row, unless tied.
    read = [t for name, t in tensors.items() if name != "token_embd.weight" or tied]
    linear = [t for name, t in tensors.items() if len(t.shape) == 2 and (name != "token_embd.weight" or tied)]
    return {"architecture": reader.fields["general.architecture"].contents(),
            "gguf_type": gguf_type_of_reader(reader),
            "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
            "file_bytes": path.stat().st_size,
            "weight_bytes": int(sum(t.n_bytes for t in read)),
            "linear_flops_per_token": int(2 * sum(t.n_elements for t in linear))}


def speed_table(result: dict) -> str:
    """A markdown table of measured llama.cpp speedups next to their ideal ratios."""
    lines = [("| pruned GGUF | weight MiB | prefill speedup | ideal (FLOPs) | decode speedup | ideal (bytes) "
              "| decode / ideal |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['pruned']} | {c['weight_bytes'] / 2**20:.1f} | {c['prefill_speedup']:.2f}x "
                     f"| {c['prefill_ideal_flops']:.2f}x | {c['decode_speedup']:.2f}x | {c['decode_ideal_bytes']:.2f}x "
                     f"| {c['decode_fraction_of_ideal_bytes']:.2f} |")
    return "\n".join(lines)


def gguf_file(path: str | Path) -> Path:
    """A .gguf file, or the model.gguf in an export folder; a LoraPruneError otherwise."""
    path = Path(path)
    if path.is_dir() and (path / "model.gguf").is_file():
        return path / "model.gguf"
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise LoraPruneError(f"{path} is not a GGUF file or a folder with model.gguf; "
                         "pass what `loraprune prune --format gguf` wrote")


def gguf_type_of(path: Path) -> str:
    """The --gguf-type name of a file written by loraprune (from general.file_type)."""
    return gguf_type_of_reader(read_gguf(path))


def gguf_type_of_reader(reader: GGUFHeader) -> str:
    names = {t.file_type: name for name, t in GGUF_TYPES.items()}
    field = reader.fields.get("general.file_type")
    file_type = LlamaFileType(int(field.contents())) if field is not None else None
    return names.get(file_type, str(file_type))


def write_dense_gguf(model: str, gguf_type: str, out_dir: Path) -> Path:
    """The unpruned ``model`` written as a GGUF file of ``gguf_type`` (validated like any export)."""
    from loraprune.export import ExportRequest, export_model
    from loraprune.models.loading import load_model, source_gguf_file
    from loraprune.pruning.masks import ModelMasks

    loaded, tokenizer = load_model(model)
    export_model(ExportRequest(loaded, ModelMasks.for_model(loaded), tokenizer, {"source_model": model, "dense": True},
                               out_dir, format="gguf", gguf_type=gguf_type, source_gguf=source_gguf_file(model)))
    return out_dir / "model.gguf"


def _compare(dense: dict, pruned: dict) -> dict:
    prefill = pruned["prefill_tokens_per_second_median"] / dense["prefill_tokens_per_second_median"]
    decode = pruned["decode_tokens_per_second_median"] / dense["decode_tokens_per_second_median"]
    ideal_bytes = dense["weight_bytes"] / pruned["weight_bytes"]
    return {"pruned": pruned["name"], "architecture": pruned["architecture"], "weight_bytes": pruned["weight_bytes"],
            "prefill_speedup": prefill,
            "prefill_ideal_flops": dense["linear_flops_per_token"] / pruned["linear_flops_per_token"],
            "decode_speedup": decode, "decode_ideal_bytes": ideal_bytes,
            "decode_fraction_of_ideal_bytes": decode / ideal_bytes}


def _names(files: list[Path]) -> dict[str, Path]:
    """Short unique names: the export folder's name (or the file's stem)."""
    names: dict[str, Path] = {}
    for path in files:
        base = path.parent.name if path.name == "model.gguf" else path.stem
        name, suffix = base, 2
        while name in names or name == "dense":
            name, suffix = f"{base}-{suffix}", suffix + 1
        names[name] = path
    return names
