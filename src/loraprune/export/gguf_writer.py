"""Write a pruned model as one GGUF file for llama.cpp, validated in llama.cpp before it is put in place.

Arch ``llama`` when every layer keeps the same widths, ``deci`` (which builds each layer with its
own head, KV-head and FFN counts) when they differ. Conventions follow llama.cpp's own
convert_hf_to_gguf.py (LlamaModel, DeciModel): Q and K rows permuted for its RoPE layout, head
size and RoPE dimensions written explicitly, norms kept in float32.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType, quants
from torch import nn
from transformers import PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.export.gguf_header import GGUFTensor, read_gguf
from loraprune.export.gguf_types import (
    GGUF_TYPES,
    check_gguf_type,
    check_projection_types,
    check_widths_fit,
    fallback_rows,
    projection_types,
    quantize_gguf,
)
from loraprune.export.gguf_vocab import add_vocab, check_vocab
from loraprune.export.llamacpp import GreedyRun, LlamaCpp
from loraprune.export.logit_check import LogitComparison, compare_logits, logits_of
from loraprune.export.slicing import LayerWidths, layer_widths, layers_report, slice_model
from loraprune.export.writer import ExportRequest, ExportWriter, TrainedLogits, WrittenModel, register_writer
from loraprune.models import ArchSpec, decoder_layers, unwrap
from loraprune.models.loading import drop_quantizer
from loraprune.pruning.groups import LayerShape

GGUF_NAME = "model.gguf"
PENALTY_REPEAT_KEY = "general.sampling.penalty_repeat"  # read into llama.cpp's sampling defaults (common.cpp)
UNQUANTISED_NAME = "model-f16.gguf"  # what llama.cpp's quantizer reads, removed once it has written
GREEDY_PROMPT_TOKENS = 16
GREEDY_NEW_TOKENS = 16
GREEDY_CANDIDATES = 5


@register_writer("gguf")
class GgufWriter(ExportWriter):
    """One GGUF file, checked in llama.cpp: its logits on the probe and its greedy continuation."""

    checked = "llama.cpp's logits for the written GGUF"
    advice = "Try --gguf-type f32, or report this"

    def refuse(self, request: ExportRequest) -> None:
        """A weight type, architecture, widths or tokenizer llama.cpp would not run as trained."""
        check_gguf_type(request.gguf_type)
        check_architecture(unwrap(request.model), request.spec)
        widths = layer_widths(request.masks, request.shape)  # raises for widths no layer can hold
        check_widths_fit(request.gguf_type, request.shape, widths)
        check_vocab(request.tokenizer, request.source_gguf)
        check_no_bias_compensation(request.masks.means is not None)

    def write(self, merged: PreTrainedModel, request: ExportRequest, reference: TrainedLogits,
              folder: Path) -> WrittenModel:
        """Slice per layer, write ``model.gguf`` (quantised by llama.cpp where the type asks), run it in llama.cpp."""
        widths = layer_widths(request.masks, request.shape)
        dense_f16_bytes = 2 * merged.num_parameters()
        sliced = slice_model(merged, request.masks, request.spec, per_layer=True)
        drop_quantizer(sliced)
        architecture = "llama" if len(set(widths)) == 1 else "deci"
        path = folder / GGUF_NAME
        vocab_source = write_quantised_gguf(path, sliced.config, widths, architecture, request.gguf_type,
                                            request.tokenizer, request.source_gguf,
                                            gguf_tensors(sliced, request.spec, widths), request.threads,
                                            request.repetition_penalty or 1.0)
        stored = read_gguf(path).tensors
        quantised_by_llamacpp = GGUF_TYPES[request.gguf_type].by_llamacpp
        fallbacks = check_projection_types(stored, request.gguf_type) if quantised_by_llamacpp else 0
        type_floor = weight_rounding_floor(sliced, request.spec, widths, stored, reference.probe, reference.merged)
        llama_logits, comparisons = llamacpp_run(path, output_matrix(stored), sliced, reference, request.threads)
        summary = {"format": "gguf", "file": GGUF_NAME, "gguf_type": request.gguf_type,
                   "architecture": architecture, "tokenizer": vocab_source,
                   "parameters_after": sliced.num_parameters(), "file_bytes": path.stat().st_size,
                   "dense_f16_bytes": dense_f16_bytes,
                   "projection_types": dict(Counter(projection_types(stored).values())),
                   "fallback_projections": fallbacks, "fallback_rows": fallback_rows(request.gguf_type, request.shape),
                   "layers": layers_report(request.masks, request.shape)}
        return WrittenModel(summary, llama_logits, floors={"weight_type": type_floor}, comparisons=comparisons)


def check_no_bias_compensation(compensated: bool) -> None:
    """Refuse a run with --bias-compensation: this writer writes no bias tensors (yet; llama.cpp's graphs
    would add attn_output.bias / ffn_down.bias)."""
    if compensated:
        raise LoraPruneError("--bias-compensation is not written to GGUF files yet; export --format transformers "
                             "or nemotron-nas, or drop --bias-compensation")


def check_architecture(model: PreTrainedModel, spec: ArchSpec) -> None:
    """Refuse a model llama.cpp's llama/deci graphs would not compute the same way."""
    config = model.config
    if spec.family not in ("llama", "mistral"):
        raise LoraPruneError(f"GGUF export writes Llama and Mistral models, not {spec.family}; "
                             "export --format transformers")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LoraPruneError("GGUF export writes bias-free Llama models; export --format transformers")
    if getattr(config, "sliding_window", None):
        raise LoraPruneError("GGUF export does not write sliding-window attention; export --format transformers")
    if _rope(config)[1] not in ("default", "linear"):
        raise LoraPruneError(f"GGUF export writes default or linear RoPE, not {_rope(config)[1]!r}; "
                             "export --format transformers and convert with llama.cpp's convert_hf_to_gguf.py")


def write_quantised_gguf(path: Path, config, widths: list[LayerWidths], architecture: str, gguf_type: str,
                         tokenizer, source_gguf: Path | None, tensors: Iterable[tuple[str, np.ndarray]],
                         threads: int | None = None, repetition_penalty: float = 1.0) -> str:
    """Write ``gguf_type`` directly, or f16 that llama.cpp's quantizer then converts; returns the tokenizer's origin.

    ``tensors``: (GGUF name, float32 array) in the order :func:`gguf_tensors` gives them.
    """
    if not GGUF_TYPES[gguf_type].by_llamacpp:
        return write_gguf(path, config, widths, architecture, gguf_type, tokenizer, source_gguf, tensors,
                          repetition_penalty)
    unquantised = path.with_name(UNQUANTISED_NAME)
    try:
        vocab_source = write_gguf(unquantised, config, widths, architecture, "f16", tokenizer, source_gguf, tensors,
                                  repetition_penalty)
        quantize_gguf(unquantised, path, gguf_type, threads)
    finally:
        unquantised.unlink(missing_ok=True)
    return vocab_source


def write_gguf(path: Path, config, widths: list[LayerWidths], architecture: str, gguf_type: str, tokenizer,
               source_gguf: Path | None, tensors: Iterable[tuple[str, np.ndarray]],
               repetition_penalty: float = 1.0) -> str:
    """Write a model config's hyper-parameters, the tokenizer and the weights; returns the tokenizer's origin.

    A ``repetition_penalty`` other than 1 becomes the file's ``general.sampling.penalty_repeat``, the
    default llama.cpp decodes with unless told otherwise (it penalises its last 64 tokens by default,
    transformers the whole text: the same for short answers).
    """
    head_dim = LayerShape.from_config(config).head_dim
    writer = GGUFWriter(path, architecture, use_temp_file=True)  # weights go to disk as they come
    writer.add_type("model")
    writer.add_name(str(getattr(config, "_name_or_path", "") or "loraprune-pruned"))
    writer.add_file_type(GGUF_TYPES[gguf_type].file_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(widths))
    per_layer = architecture == "deci"
    # Plain Python ints: the gguf writer refuses numpy integers in arrays.
    writer.add_head_count([w.heads for w in widths] if per_layer else widths[0].heads)
    writer.add_head_count_kv([w.kv_heads for w in widths] if per_layer else widths[0].kv_heads)
    writer.add_feed_forward_length([w.ffn for w in widths] if per_layer else widths[0].ffn)
    # Without these llama.cpp derives the head size from hidden / heads of layer 0.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    theta, rope_type, factor = _rope(config)
    writer.add_rope_freq_base(theta)
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if repetition_penalty != 1.0:  # llama.cpp's default; the key by name: older gguf packages lack its method
        writer.add_float32(PENALTY_REPEAT_KEY, repetition_penalty)
    vocab_source = add_vocab(writer, tokenizer, config.vocab_size, source_gguf)
    for name, array in tensors:
        stored, raw_type = stored_tensor(array, gguf_type)
        writer.add_tensor(name, stored, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab_source


def gguf_sources(model: PreTrainedModel, spec: ArchSpec, widths: list[LayerWidths]):
    """(GGUF name, parameter, heads to RoPE-permute or None) of every weight the file holds."""
    yield "token_embd.weight", model.get_input_embeddings().weight, None
    for index, (layer, width) in enumerate(zip(decoder_layers(model, spec), widths)):
        attention, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        prefix = f"blk.{index}"
        yield f"{prefix}.attn_norm.weight", layer.input_layernorm.weight, None
        yield f"{prefix}.attn_q.weight", getattr(attention, spec.q_proj).weight, width.heads
        yield f"{prefix}.attn_k.weight", getattr(attention, spec.k_proj).weight, width.kv_heads
        yield f"{prefix}.attn_v.weight", getattr(attention, spec.v_proj).weight, None
        yield f"{prefix}.attn_output.weight", getattr(attention, spec.o_proj).weight, None
        yield f"{prefix}.ffn_norm.weight", layer.post_attention_layernorm.weight, None
        yield f"{prefix}.ffn_gate.weight", getattr(mlp, spec.gate_proj).weight, None
        yield f"{prefix}.ffn_up.weight", getattr(mlp, spec.up_proj).weight, None
        yield f"{prefix}.ffn_down.weight", getattr(mlp, spec.down_proj).weight, None
    yield "output_norm.weight", model.model.norm.weight, None
    if not model.config.tie_word_embeddings:  # llama.cpp reuses token_embd when output is absent
        yield "output.weight", model.get_output_embeddings().weight, None


def gguf_tensors(model: PreTrainedModel, spec: ArchSpec, widths: list[LayerWidths]):
    """(GGUF name, float32 array) of every weight, Q and K permuted per layer for llama.cpp's RoPE."""
    for name, parameter, rope_heads in gguf_sources(model, spec, widths):
        array = parameter.detach().to(torch.float32).cpu().numpy()
        yield name, array if rope_heads is None else rope_permuted(array, rope_heads)


def rope_permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half layout to llama.cpp's interleaved pairs."""
    # (heads * head_dim, in) -> (heads, 2, head_dim / 2, in) -> swap the middle axes (convert_hf_to_gguf).
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def rope_unpermuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`rope_permuted`: llama.cpp's interleaved pairs back to HF's rotate-half rows."""
    return (weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def stored_tensor(array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The array as this writer stores it: norms in float32, weights in f32, f16 or Q8_0 (rows of 32)."""
    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), GGMLQuantizationType.F32
    if gguf_type == "q8_0":
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), GGMLQuantizationType.F16


def dequantised(tensor: GGUFTensor) -> np.ndarray:
    """A GGUF tensor as the runtime computes with it: float32, in PyTorch's (out, in) order."""
    return quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))


def output_matrix(tensors: list[GGUFTensor]) -> np.ndarray:
    """The output matrix as the file stores it (the token embedding when the model ties them)."""
    by_name = {t.name: t for t in tensors}
    return dequantised(by_name.get("output.weight", by_name["token_embd.weight"]))


def weight_rounding_floor(model: PreTrainedModel, spec: ArchSpec, widths: list[LayerWidths],
                          tensors: list[GGUFTensor], probe: torch.Tensor, reference: torch.Tensor) -> LogitComparison:
    """How far logits move when the model computes with the weights as the file (``tensors``) stores them."""
    if all(t.tensor_type == GGMLQuantizationType.F32 for t in tensors):
        return LogitComparison(0.0, 0.0, 1.0)
    stored = {t.name: dequantised(t) for t in tensors if len(t.shape) == 2}
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter, rope_heads in gguf_sources(rounded, spec, widths):
            if name in stored:
                weight = stored[name] if rope_heads is None else rope_unpermuted(stored[name], rope_heads)
                parameter.copy_(torch.from_numpy(np.ascontiguousarray(weight)).to(parameter.dtype))
    return compare_logits(logits_of(rounded, probe), reference)


def llamacpp_run(path: Path, output: np.ndarray, sliced: PreTrainedModel, reference: TrainedLogits,
                 threads: int | None) -> tuple[torch.Tensor, dict]:
    """Load the file in llama.cpp: its logits on the probe (its hidden states times ``output``, the file's output
    matrix), and its comparisons with PyTorch (greedy too)."""
    ids = reference.probe[0].tolist()
    prompt = ids[:GREEDY_PROMPT_TOKENS]
    runtime = LlamaCpp(path, context=_context_for(len(ids) + GREEDY_NEW_TOKENS), threads=threads, embeddings=True)
    try:
        llama_logits = logits_from_hidden(runtime.hidden_states(ids), output)
        greedy = runtime.greedy(prompt, GREEDY_NEW_TOKENS, candidates=GREEDY_CANDIDATES)
    finally:
        runtime.close()
    if not torch.isfinite(llama_logits).all():
        raise LoraPruneError("llama.cpp computes non-finite logits for the written GGUF; export with --gguf-type f32")
    return llama_logits, {"runtime": "llama.cpp (xllamacpp), f32 KV cache, flash attention off",
                          "llamacpp": compare_logits(llama_logits, reference.merged).to_dict(),
                          "greedy": greedy_comparison(sliced, prompt, greedy)}


def greedy_comparison(model: nn.Module, prompt: list[int], greedy: GreedyRun) -> dict:
    """The PyTorch model fed llama.cpp's greedy continuation: does it pick the same tokens, at the same odds?"""
    continued = torch.tensor([prompt + greedy.tokens])
    logprobs = torch.log_softmax(logits_of(model, continued)[0, len(prompt) - 1:-1].double(), dim=-1)
    chosen = torch.tensor(greedy.tokens)
    raw = (logprobs[torch.arange(len(chosen)), chosen] - torch.tensor(greedy.logprobs).double()).abs()
    # Log-probabilities relative to the step's best candidate: free of llama.cpp's float32 normaliser.
    relative = max(abs((logprobs[step, token] - logprobs[step, top[0][0]]).item() - (logprob - top[0][1]))
                   for step, top in enumerate(greedy.top) for token, logprob in top)
    return {"prompt_tokens": len(prompt), "new_tokens": len(chosen),
            "agreement": float((logprobs.argmax(-1) == chosen).double().mean()),
            "max_logprob_difference": float(raw.max()), "max_relative_logprob_difference": relative}


def logits_from_hidden(hidden: np.ndarray, output: np.ndarray) -> torch.Tensor:
    """llama.cpp's final hidden states times the output matrix as the file stores it: (1, tokens, vocab)."""
    return torch.from_numpy(hidden.astype(np.float64) @ output.astype(np.float64).T)[None]


def _context_for(tokens: int) -> int:
    return max(256, -(-tokens // 256) * 256)


def _rope(config) -> tuple[float, str, float]:
    """(theta, type, factor) of a transformers config, old (rope_theta) or new (rope_parameters) style."""
    parameters = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    return float(theta), rope_type, float(parameters.get("factor", 1.0))

