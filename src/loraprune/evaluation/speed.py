"""Measured prefill latency and decode throughput of dense vs pruned checkpoints on this machine.

Each measured speedup sits next to its ideal: the ratio of counted FLOPs and of weight bytes.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from loraprune.errors import LoraPruneError
from loraprune.models.loading import load_causal_lm
from loraprune.pruning.groups import LayerShape
from loraprune.quiet import filtered_stderr


def benchmark_speed(dense_dir: Path, pruned_dirs: list[Path], prompt_tokens: int = 512,
                    new_tokens: int = 128, repeats: int = 5, threads: int | None = None,
                    dtype: torch.dtype = torch.float32) -> dict:
    """Time prefill and decode of the dense and every pruned model, alternating, median of repeats."""
    if repeats < 1 or prompt_tokens < 1 or new_tokens < 2:
        raise LoraPruneError("need --repeats >= 1, --prompt-tokens >= 1 and --new-tokens >= 2")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _benchmark(Path(dense_dir), [Path(p) for p in pruned_dirs], prompt_tokens,
                          new_tokens, repeats, dtype)
    finally:
        torch.set_num_threads(previous_threads)


def _benchmark(dense_dir: Path, pruned_dirs: list[Path], prompt_tokens: int, new_tokens: int,
               repeats: int, dtype: torch.dtype = torch.float32) -> dict:
    """The measurement loop of `benchmark_speed`, at the current thread count."""
    load_before = _load_average()
    names = _unique_names([dense_dir] + pruned_dirs)
    for path in names.values():  # fail before spending time on loading
        _check_folder(path)
    models = {name: load_causal_lm(path, dtype) for name, path in names.items()}
    prompt = torch.randint(0, min(m.config.vocab_size for m in models.values()), (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm-up: allocator, kernels, thread pool
        time_prefill(model, prompt)
        time_decode(model, prompt[:, :16], new_tokens=4)
    floor_model = _floor_model(next(iter(models.values())).config).to(dtype)
    floor_prompt = prompt % floor_model.config.vocab_size
    time_decode(floor_model, floor_prompt[:, :16], new_tokens=4)
    floor = [1000 / time_decode(floor_model, floor_prompt, new_tokens) for _ in range(repeats)]
    del floor_model
    # Profiled apart from the timings: the profiler slows small ops, so only shares are meaningful.
    profiles = {name: decode_profile(model, prompt) for name, model in models.items()}
    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    for _ in range(repeats):
        # Alternate models inside every repeat so drift (thermal, other load) hits all alike.
        for name, model in models.items():
            prefill[name].append(time_prefill(model, prompt))
        for name, model in models.items():
            decode[name].append(time_decode(model, prompt, new_tokens))
    rows = []
    for name, model in models.items():
        rows.append({
            "name": name,
            "path": str(names[name]),
            "architecture": type(model).__name__,
            "widths": _widths(model.config),
            "parameters": model.num_parameters(),
            "weight_bytes": weight_bytes(model),
            "lm_head_parameters": model.get_output_embeddings().weight.numel(),
            "prefill_flops": prefill_flops(model, prompt_tokens),
            "decode_flops_per_token": decode_flops_per_token(model, prompt_tokens + new_tokens // 2),
            "prefill_seconds": prefill[name],
            "prefill_seconds_median": statistics.median(prefill[name]),
            "decode_tokens_per_second": decode[name],
            "decode_tokens_per_second_median": statistics.median(decode[name]),
            "decode_profile_ms_per_token": profiles[name],
        })
    floor_ms = statistics.median(floor)
    for row in rows:
        row["decode_floor_ms_per_token"] = floor_ms
    machine = {**machine_info(), "load_average_before": load_before,
               "load_average_after": _load_average()}
    return {
        "machine": machine,
        "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
                     "batch_size": 1, "dtype": str(dtype).removeprefix("torch.")},
        "models": rows,
        "comparisons": [_compare(rows[0], row) for row in rows[1:]],
    }


@torch.inference_mode()
def time_prefill(model: nn.Module, prompt: torch.Tensor) -> float:
    """Seconds for one forward pass over the prompt, as generate's first step (last logits only)."""
    start = time.perf_counter()
    model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


class _StepClock(LogitsProcessor):
    """Records when each generation step reaches the logits processors."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode tokens per second with the KV cache, prefill excluded."""
    clock = _StepClock()
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    # The first stamp follows the prefill; the steps after it are pure one-token decode.
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


@torch.inference_mode()
def decode_profile(model: nn.Module, prompt: torch.Tensor, steps: int = 8) -> dict[str, float]:
    """Milliseconds per decode step spent in matmuls, attention kernels and everything else."""
    from torch.profiler import ProfilerActivity, profile

    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    with filtered_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            kind = "matmul"
        elif "scaled_dot_product" in event.key:
            kind = "attention"
        else:
            kind = "other"
        totals[kind] += event.self_cpu_time_total / 1000 / steps  # microseconds -> ms per step
    return totals


def linear_flops_per_token(model: nn.Module, include_lm_head: bool = True) -> int:
    """Multiply-add FLOPs (2 per MAC) of every nn.Linear for one token."""
    output = model.get_output_embeddings()
    return sum(2 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear) and (include_lm_head or m is not output))


def attention_flops(config, query_tokens: int, context: int) -> int:
    """Score (QK^T) and weighted-value (AV) FLOPs of all layers for queries over a context."""
    blocks = getattr(config, "block_configs", None)
    if blocks:  # DeciLM: only attention blocks attend, each over all query-head slots
        heads, head_dim = config.num_attention_heads, config.head_dim
        layers = sum(not b.attention.no_op for b in blocks)
    else:
        shape = LayerShape.from_config(config)
        heads, head_dim, layers = shape.num_heads, shape.head_dim, config.num_hidden_layers
    return 2 * 2 * heads * head_dim * query_tokens * context * layers


def prefill_flops(model: nn.Module, prompt_tokens: int) -> int:
    """FLOPs of a causal prefill: every linear per token, lm_head once, causal attention."""
    lm_head = linear_flops_per_token(model) - linear_flops_per_token(model, include_lm_head=False)
    causal_pairs = prompt_tokens * (prompt_tokens + 1) // 2
    return (prompt_tokens * linear_flops_per_token(model, include_lm_head=False) + lm_head
            + attention_flops(model.config, query_tokens=1, context=causal_pairs))


def decode_flops_per_token(model: nn.Module, context: int) -> int:
    """FLOPs of one decode step at the given context length, lm_head included."""
    return linear_flops_per_token(model) + attention_flops(model.config, 1, context)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads: all parameters except the embedding table."""
    # A tied embedding is read as lm_head anyway; an untied one only as one row per token.
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if tied or p is not embedding)


def machine_info() -> dict:
    """CPU model, core counts, torch version and thread count of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil
        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    import transformers
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def speed_table(result: dict) -> str:
    """A markdown table of measured speedups next to their ideal ratios."""
    lines = [("| pruned model | params | prefill speedup | ideal (FLOPs) | decode speedup "
             "| ideal (FLOPs) | ideal (bytes) |"),
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["comparisons"]:
        lines.append(
            f"| {c['pruned']} | {c['parameters']:,} ({c['parameter_fraction']:.0%}) "
            f"| {c['prefill_speedup']:.2f}x | {c['prefill_ideal_flops']:.2f}x "
            f"| {c['decode_speedup']:.2f}x | {c['decode_ideal_flops']:.2f}x "
            f"| {c['decode_ideal_bytes']:.2f}x |")
    return "\n".join(lines)


def _compare(dense: dict, pruned: dict) -> dict:
    """Speedups of one pruned model over the dense one, measured and ideal."""
    prefill = dense["prefill_seconds_median"] / pruned["prefill_seconds_median"]
    decode = pruned["decode_tokens_per_second_median"] / dense["decode_tokens_per_second_median"]
    ideal_prefill = dense["prefill_flops"] / pruned["prefill_flops"]
    ideal_decode = dense["decode_flops_per_token"] / pruned["decode_flops_per_token"]
    # Measured Amdahl bound: the floor (same depth, ~no width, no vocabulary) does not shrink.
    floor = dense["decode_floor_ms_per_token"]
    dense_ms = 1000 / dense["decode_tokens_per_second_median"]
    floor_bound = dense_ms / (floor + (dense_ms - floor) / ideal_decode)
    # Amdahl: if matmul and attention time shrank by the FLOP ratio and the rest (norms, rope,
    # cache updates, per-op dispatch) stayed, decode could reach at best this speedup.
    step = dense["decode_profile_ms_per_token"]
    scalable = step["matmul"] + step["attention"]
    matmul_bound = (step["other"] + scalable) / (step["other"] + scalable / ideal_decode)
    return {
        "pruned": pruned["name"],
        "parameters": pruned["parameters"],
        "parameter_fraction": pruned["parameters"] / dense["parameters"],
        "prefill_speedup": prefill,
        "prefill_ideal_flops": ideal_prefill,
        "prefill_fraction_of_ideal": prefill / ideal_prefill,
        "decode_speedup": decode,
        "decode_ideal_flops": ideal_decode,
        "decode_ideal_bytes": dense["weight_bytes"] / pruned["weight_bytes"],
        "decode_fraction_of_ideal": decode / ideal_decode,
        "decode_bound_if_only_matmuls_shrink": matmul_bound,
        "decode_bound_with_measured_floor": floor_bound,
    }


def _check_folder(path: Path) -> None:
    """A LoraPruneError unless `path` is a Hugging Face model folder."""
    if not (path / "config.json").is_file():
        raise LoraPruneError(f"{path} is not a Hugging Face model folder (no config.json); "
                             "pass folders written by `loraprune prune` or save_pretrained")


def _floor_model(config) -> nn.Module:
    """A model of the same depth and hidden size with one head, one FFN channel, 64 tokens."""
    # Its decode step is the per-layer work no pruning removes: norms, rope, cache, dispatch.
    floor_config = copy.deepcopy(config)
    floor_config.num_attention_heads = floor_config.num_key_value_heads = 1
    floor_config.head_dim = LayerShape.from_config(config).head_dim
    floor_config.intermediate_size = 1
    floor_config.vocab_size = 64
    floor_config.tie_word_embeddings = False
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(floor_config, dtype=torch.float32).eval()


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _widths(config) -> dict:
    blocks = getattr(config, "block_configs", None)
    if blocks:  # a DeciLM folder: every layer its own KV heads and FFN width (0 = no-op block)
        return {"heads": config.num_attention_heads, "head_dim": config.head_dim, "layers": config.num_hidden_layers,
                "kv_heads": [0 if b.attention.no_op else config.num_attention_heads // b.attention.n_heads_in_group
                             for b in blocks],
                "intermediate_size": [0 if b.ffn.no_op else b.ffn.intermediate_size for b in blocks]}
    shape = LayerShape.from_config(config)
    return {"heads": shape.num_heads, "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate_size, "layers": config.num_hidden_layers}


def _unique_names(paths: list[Path]) -> dict[str, Path]:
    """Short display names (folder names, numbered when they repeat)."""
    names: dict[str, Path] = {}
    for path in paths:
        name, n = path.name or str(path), 2
        while name in names:
            name, n = f"{path.name}-{n}", n + 1
        names[name] = path
    return names
