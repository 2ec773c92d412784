"""What a Hugging Face checkpoint folder or a GGUF file holds: size, architecture, per-layer widths.

Reads config.json and the safetensors headers (or the GGUF header) only, so it is instant even for large models.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from loraprune.errors import LoraPruneError

REPORT_NAME = "loraprune.json"


def checkpoint_info(folder: Path) -> dict:
    """Parameters, on-disk bytes, architecture, widths and any loraprune.json summary of a folder."""
    folder = Path(folder)
    ggufs = [folder] if folder.suffix == ".gguf" and folder.is_file() else sorted(folder.glob("*.gguf"))
    config_path = folder / "config.json"
    if not config_path.is_file() and ggufs:
        info = gguf_info(ggufs[0])
        report_path = ggufs[0].parent / REPORT_NAME
        if report_path.is_file():
            info["loraprune"] = _report_summary(json.loads(report_path.read_text()))
        return info
    if not config_path.is_file():
        raise LoraPruneError(f"{folder} is not a Hugging Face checkpoint folder (no config.json) or a GGUF file; "
                             "pass a folder written by save_pretrained or `loraprune prune`, or a .gguf file")
    config = json.loads(config_path.read_text())
    weight_files = sorted(folder.glob("*.safetensors"))
    info = {
        "path": str(folder),
        "architecture": (config.get("architectures") or [config.get("model_type", "unknown")])[0],
        "model_type": config.get("model_type"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "parameters": sum(_safetensors_parameters(f) for f in weight_files) if weight_files else None,
        "disk_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "vocab_size": config.get("vocab_size"),
        "hidden_size": config.get("hidden_size"),
        "layers": _layer_widths(config),
    }
    report_path = folder / REPORT_NAME
    if report_path.is_file():
        info["loraprune"] = _report_summary(json.loads(report_path.read_text()))
    return info


def format_info(info: dict) -> str:
    """A short human-readable description of `checkpoint_info`'s result."""
    params = f"{info['parameters']:,}" if info["parameters"] is not None else "unknown (no safetensors)"
    lines = [f"{info['path']}",
             f"  architecture   {info['architecture']} ({info['model_type']}, {info['dtype']})",
             f"  parameters     {params}",
             f"  on disk        {info['disk_bytes'] / 2**20:.1f} MiB",
             (f"  hidden size    {info['hidden_size']}, vocab {info['vocab_size']}, "
             f"tied embeddings {info['tie_word_embeddings']}")]
    groups = _runs(info["layers"])
    lines.append("  layers         heads  kv heads  head dim  intermediate")
    for first, last, widths in groups:
        span = f"{first}" if first == last else f"{first}-{last}"
        lines.append(f"  {span:<14} {widths['heads']:>5}  {widths['kv_heads']:>8}  "
                     f"{widths['head_dim']:>8}  {widths['intermediate_size']:>12}")
    if "loraprune" in info:
        lines.append("  loraprune      " + ", ".join(f"{k} {v}" for k, v in info["loraprune"].items()))
    return "\n".join(lines)


def _layer_widths(config: dict) -> list[dict]:
    """Per-layer widths: from block_configs in a DeciLM folder, else one set for all layers."""
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    if config.get("block_configs"):
        return [_block_widths(block, heads, head_dim) for block in config["block_configs"]]
    widths = {"heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
              "head_dim": head_dim, "intermediate_size": config.get("intermediate_size")}
    return [dict(widths) for _ in range(config.get("num_hidden_layers") or 0)]


def _block_widths(block: dict, heads: int, head_dim: int) -> dict:
    """One DeciLM block's widths; a no-op block has width 0 (query-head slots include zero padding)."""
    attention, ffn = block["attention"], block["ffn"]
    attends = not attention.get("no_op")
    return {"heads": heads if attends else 0,
            "kv_heads": heads // attention["n_heads_in_group"] if attends else 0,
            "head_dim": head_dim,
            "intermediate_size": 0 if ffn.get("no_op") else ffn["intermediate_size"]}


def gguf_info(path: Path) -> dict:
    """Parameters, size, architecture and per-layer widths of a GGUF file, read from its header."""
    from loraprune.export.gguf_header import read_gguf

    reader = read_gguf(path)

    def field(key: str):
        value = reader.get_field(key)
        return value.contents() if value is not None else None

    arch = field("general.architecture")
    layers = field(f"{arch}.block_count") or 0

    def per_layer(key: str) -> list:
        value = field(f"{arch}.{key}")
        return list(value) if isinstance(value, list) else [value] * layers

    heads, kv_heads, ffn = per_layer("attention.head_count"), per_layer("attention.head_count_kv"), \
        per_layer("feed_forward_length")
    head_dim = field(f"{arch}.attention.key_length") or (
        field(f"{arch}.embedding_length") // max(heads) if max(heads, default=0) else None)
    return {
        "path": str(path), "architecture": arch, "model_type": "gguf",
        "dtype": sorted({t.tensor_type.name for t in reader.tensors}),
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
        "disk_bytes": path.stat().st_size,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "vocab_size": len(field("tokenizer.ggml.tokens") or []) or None,
        "hidden_size": field(f"{arch}.embedding_length"),
        "layers": [{"heads": h, "kv_heads": kv, "head_dim": head_dim, "intermediate_size": f}
                   for h, kv, f in zip(heads, kv_heads, ffn)],
    }


def _runs(layers: list[dict]) -> list[tuple[int, int, dict]]:
    """Consecutive layers with equal widths, as (first, last, widths)."""
    runs: list[tuple[int, int, dict]] = []
    for i, widths in enumerate(layers):
        if runs and runs[-1][2] == widths:
            runs[-1] = (runs[-1][0], i, widths)
        else:
            runs.append((i, i, widths))
    return runs


def _safetensors_parameters(path: Path) -> int:
    """Element count of every tensor in a safetensors file, read from its JSON header."""
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= dim
        total += count
    return total


def _report_summary(report: dict) -> dict:
    """The few fields of a loraprune.json worth a line."""
    export = report.get("export", {})
    summary = {key: report[key] for key in ("model", "target_sparsity", "achieved_sparsity",
                                            "criterion") if key in report}
    if "parameters_before" in export and "parameters_after" in export:
        summary["parameters"] = f"{export['parameters_before']:,} -> {export['parameters_after']:,}"
    if "source_architecture" in export:
        summary["from"] = export["source_architecture"]
    return summary
