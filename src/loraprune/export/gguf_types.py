"""The GGUF weight types loraprune writes, the row lengths each can hold, and llama.cpp's quantizer.

f32, f16 and q8_0 are written directly (gguf-py); q4_0 and the K-quants are written as f16 and then
quantised by llama.cpp's own quantizer (llama-cpp-python's ``llama_model_quantize``), run in a child
process: llama-cpp-python loads its libggml globally, which must not meet xllamacpp's in one process.
A quantised row must be a whole number of blocks (K-quants: 256 weights, Q4_0/Q8_0: 32), and the
row length of o_proj and down_proj is a pruned width, so widths a type cannot hold are refused. Rows the
model's own layout fixes (SmolLM2's hidden size 576) are another matter: llama.cpp stores those in its
fallback type, as in every published K-quant file of such a model, and loraprune allows that for exactly
those tensors and says so.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from loraprune.errors import LoraPruneError
from loraprune.export.gguf_header import GGUFTensor
from loraprune.pruning.groups import LayerShape

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class GGUFType:
    """One --gguf-type: its file type, the row multiple it needs, and the types its projections may have."""

    file_type: LlamaFileType
    block: int
    projection_types: frozenset[Q]
    by_llamacpp: bool  # quantised by llama.cpp's quantizer from an f16 file

    @property
    def fallback_types(self) -> frozenset[Q]:
        """What llama.cpp stores a tensor as when its rows hold no whole block of the type it chose."""
        return frozenset(FALLBACK[t] for t in self.projection_types if t in FALLBACK)


# llama.cpp's quantizer (src/llama-quant.cpp) for rows that are no multiple of 256; blocks of 32 in turn.
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
FALLBACK_BLOCK = 32


GGUF_TYPES = {
    "f32": GGUFType(LlamaFileType.ALL_F32, 1, frozenset({Q.F32}), False),
    "f16": GGUFType(LlamaFileType.MOSTLY_F16, 1, frozenset({Q.F16}), False),
    "q8_0": GGUFType(LlamaFileType.MOSTLY_Q8_0, 32, frozenset({Q.Q8_0}), False),
    "q6_k": GGUFType(LlamaFileType.MOSTLY_Q6_K, 256, frozenset({Q.Q6_K}), True),
    # The _M mixes give attn_v and half the ffn_down tensors more bits (llama.cpp's own choice).
    "q5_k_m": GGUFType(LlamaFileType.MOSTLY_Q5_K_M, 256, frozenset({Q.Q5_K, Q.Q6_K}), True),
    "q4_k_m": GGUFType(LlamaFileType.MOSTLY_Q4_K_M, 256, frozenset({Q.Q4_K, Q.Q5_K, Q.Q6_K}), True),
    "q4_0": GGUFType(LlamaFileType.MOSTLY_Q4_0, 32, frozenset({Q.Q4_0}), True),
}


def check_gguf_type(gguf_type: str) -> GGUFType:
    """The named type, or a LoraPruneError listing the choices."""
    if gguf_type not in GGUF_TYPES:
        raise LoraPruneError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    return GGUF_TYPES[gguf_type]


def default_round_to(gguf_type: str) -> int:
    """The FFN rounding a type needs: down_proj's quantised rows are the kept FFN width."""
    return check_gguf_type(gguf_type).block


def check_row_lengths(gguf_type: str, rows: dict[str, int], fix: str) -> None:
    """Refuse any named row length that is no whole number of the type's blocks."""
    block = check_gguf_type(gguf_type).block
    for what, length in rows.items():
        if length % block:
            raise LoraPruneError(f"--gguf-type {gguf_type} stores rows in blocks of {block}, and {what} is "
                                 f"{length}, no multiple of {block} (llama.cpp would store it in another type); "
                                 f"{fix}")


def model_row_lengths(shape: LayerShape) -> dict[str, int]:
    """The row lengths the model's own layout fixes (what no pruning width chooses)."""
    return {"the hidden size (the rows of q/k/v/gate/up)": shape.hidden_size,
            "all heads' attention output (the rows of o_proj)": shape.num_heads * shape.head_dim,
            "the FFN width (the rows of down_proj in layers kept whole)": shape.intermediate_size}


def falls_back(gguf_type: str, length: int, model_length: int) -> bool:
    """Whether llama.cpp may store rows of ``length`` in its fallback type: only where the model's own row
    length (``model_length``, the dense width of the same rows) holds no whole block either."""
    kind = check_gguf_type(gguf_type)
    return (bool(kind.fallback_types) and model_length % kind.block != 0 and length % kind.block != 0
            and length % FALLBACK_BLOCK == 0)


def fallback_rows(gguf_type: str, shape: LayerShape) -> list[str]:
    """The model's own row lengths that llama.cpp will store in its fallback type, each as "what is N"."""
    return [f"{what} is {length}" for what, length in model_row_lengths(shape).items()
            if falls_back(gguf_type, length, length)]


def fallback_note(gguf_type: str, shape: LayerShape) -> str | None:
    """One line naming the model's row lengths that llama.cpp will store in its fallback type, if any."""
    kind = check_gguf_type(gguf_type)
    forced = fallback_rows(gguf_type, shape)
    if not forced:
        return None
    fallbacks = "/".join(sorted(t.name.lower() for t in kind.fallback_types))
    return (f"--gguf-type {gguf_type} stores rows in blocks of {kind.block}, and in this model {'; '.join(forced)}: "
            f"llama.cpp stores those tensors as {fallbacks} (its own fallback, as in every published {gguf_type} "
            "file of this model); the FFN widths pruning chooses are rounded to fit")


def check_widths_fit(gguf_type: str, shape: LayerShape, widths: list) -> None:
    """Refuse sliced widths (``LayerWidths`` per layer) whose quantised rows the type cannot hold."""
    block = check_gguf_type(gguf_type).block
    hidden, attention, ffn = model_row_lengths(shape).values()
    rows = {}
    if not falls_back(gguf_type, hidden, hidden):
        rows["the hidden size (the rows of q/k/v/gate/up)"] = hidden
    for index, width in enumerate(widths):
        if not falls_back(gguf_type, width.heads * shape.head_dim, attention):
            rows[f"layer {index}'s attention output ({width.heads} heads x {shape.head_dim})"] = (
                width.heads * shape.head_dim)
        if not (width.ffn == ffn and falls_back(gguf_type, width.ffn, ffn)):
            rows[f"layer {index}'s FFN width (the rows of down_proj)"] = width.ffn
    check_row_lengths(gguf_type, rows, f"prune with --round-to {block} (the default for this type), "
                      "or choose --gguf-type f16")


def check_reachable_widths_fit(gguf_type: str, shape: LayerShape, round_to: int, attention_unit: str,
                               attention_fraction: float | None) -> str | None:
    """Before training: refuse a model or settings that could end in widths the type cannot hold; the
    note on rows the model's own layout sends to llama.cpp's fallback type, if any."""
    block = check_gguf_type(gguf_type).block
    if block == 1:
        return None
    coarser = "q4_0 or q8_0 (blocks of 32), or f16" if block > 32 else "f16"
    hidden, attention, ffn = model_row_lengths(shape).values()
    if not falls_back(gguf_type, hidden, hidden):
        check_row_lengths(gguf_type, {"this model's hidden size (the rows of q/k/v/gate/up)": hidden},
                          f"choose --gguf-type {coarser}")
    if not falls_back(gguf_type, ffn, ffn):
        check_row_lengths(gguf_type, {"this model's FFN width (kept whole in skipped layers)": ffn},
                          f"choose --gguf-type {coarser}")
    check_row_lengths(gguf_type, {f"--round-to {round_to} (kept FFN widths are the rows of down_proj)": round_to},
                      f"pass --round-to {block} (the default for this type), or leave --round-to out")
    if attention_fraction != 0:
        heads_per_unit = shape.queries_per_kv if attention_unit == "kv_group" else shape.num_kv_heads
        step = heads_per_unit * shape.head_dim
        if not falls_back(gguf_type, step, attention):
            check_row_lengths(gguf_type, {f"one attention unit's share of o_proj's rows ({heads_per_unit} heads x "
                                          f"{shape.head_dim}), by which kept widths step": step},
                              f"pass --attention-fraction 0 (prune FFN channels only), or choose --gguf-type {coarser}")
    return fallback_note(gguf_type, shape)


def quantize_gguf(source: Path, out: Path, gguf_type: str, threads: int | None = None) -> None:
    """Quantise an f16/f32 GGUF file to ``gguf_type`` with llama.cpp's quantizer (in a child process)."""
    file_type = int(check_gguf_type(gguf_type).file_type)
    code = ("import sys, llama_cpp\n"
            "params = llama_cpp.llama_model_quantize_default_params()\n"
            "params.ftype = int(sys.argv[3]); params.nthread = int(sys.argv[4])\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))\n")
    try:
        import llama_cpp  # noqa: F401  (only to give a clear error when it is missing)
    except ImportError as e:
        raise LoraPruneError(f"--gguf-type {gguf_type} needs llama.cpp's quantizer: pip install "
                             "'loraprune[gguf]' (llama-cpp-python), or choose --gguf-type f16 or q8_0") from e
    done = subprocess.run([sys.executable, "-c", code, str(source), str(out), str(file_type), str(threads or 0)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoraPruneError(f"llama.cpp's quantizer failed on {source.name} ({last}); try --gguf-type f16")


def projection_types(tensors: list[GGUFTensor]) -> dict[str, str]:
    """GGUF tensor name -> stored type name, for every attention and FFN projection of a file's ``tensors``."""
    return {t.name: t.tensor_type.name for t in tensors if t.name.split(".")[-2] in PROJECTIONS}


def check_projection_types(tensors: list[GGUFTensor], gguf_type: str) -> int:
    """Refuse a file in which llama.cpp stored some projection in a type the requested one does not allow;
    the number of projections in its fallback type (rows that hold no whole block, which the writer allowed)."""
    kind = check_gguf_type(gguf_type)
    fallbacks, wrong = 0, {}
    for tensor in tensors:
        if tensor.name.split(".")[-2] not in PROJECTIONS:
            continue
        fits = int(tensor.shape[0]) % kind.block == 0  # GGUF's first dimension: the row length
        allowed = kind.projection_types if fits else kind.fallback_types
        if tensor.tensor_type not in allowed:
            wrong[tensor.name] = tensor.tensor_type.name
        fallbacks += not fits
    if wrong:
        name, stored = next(iter(wrong.items()))
        raise LoraPruneError(f"llama.cpp stored {len(wrong)} projections in another type than {gguf_type} "
                             f"({name}: {stored}); report this, or choose --gguf-type f16")
    return fallbacks
