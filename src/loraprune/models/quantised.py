"""A frozen base quantised to 8 or 4 bits (bitsandbytes), as the paper's 8-bit variant, and back.

Only the seven prunable projections of every decoder layer are quantised (embeddings, norms and
the LM head stay in the model's dtype). PEFT puts its own LoRA layers around the bitsandbytes ones;
scorers read rows of W dequantised as they go; export turns them back into plain nn.Linear first.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.models.specs import ArchSpec, decoder_layers, spec_for

BASE_BITS = (8, 4)
INSTALL = 'pip install "loraprune[quantised]" (bitsandbytes ≥ 0.48, which has CPU kernels)'


def bitsandbytes() -> ModuleType:
    """The bitsandbytes module, or an error that says how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise LoraPruneError(f"--base-bits needs bitsandbytes; install it with: {INSTALL}") from e
    return bnb


def quantise_frozen_base(model: nn.Module, bits: int) -> None:
    """Replace every prunable projection of ``model`` (a transformers model) by a ``bits``-bit one, in place."""
    if bits not in BASE_BITS:
        raise LoraPruneError(f"--base-bits must be one of {', '.join(map(str, BASE_BITS))}, got {bits}")
    bnb = bitsandbytes()
    spec = spec_for(model.config)
    device = next(model.parameters()).device
    for layer in decoder_layers(model, spec):
        for parent_name, name in _projection_paths(spec):
            parent = getattr(layer, parent_name)
            setattr(parent, name, _quantised_linear(bnb, getattr(parent, name), bits, device))
    # PEFT reads these to choose its bitsandbytes LoRA layers.
    model.is_loaded_in_8bit, model.is_loaded_in_4bit = bits == 8, bits == 4


def _projection_paths(spec: ArchSpec) -> list[tuple[str, str]]:
    return [(spec.attention, name) for name in (spec.q_proj, spec.k_proj, spec.v_proj, spec.o_proj)] + \
           [(spec.mlp, name) for name in (spec.gate_proj, spec.up_proj, spec.down_proj)]


def _quantised_linear(bnb: ModuleType, linear: nn.Linear, bits: int, device: torch.device) -> nn.Module:
    has_bias = linear.bias is not None
    if bits == 8:
        # threshold 0: no outlier columns kept in float16, every weight is int8 (LLM.int8 without outliers).
        quantised = _int8_weight_linear_class(bnb)(linear.in_features, linear.out_features, has_bias,
                                                   has_fp16_weights=False, threshold=0.0)
    else:
        # compress_statistics=False keeps the block scales plain, so rows can be dequantised alone.
        quantised = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias,
                                      compute_dtype=linear.weight.dtype, compress_statistics=False,
                                      quant_type="nf4")
        # On a CPU with AVX-512 BF16, an eval-mode forward would repack the weight for a bfloat16
        # kernel: the layer then computes in another precision than it trained in, and its packed
        # bytes no longer dequantise as rows (the export merged garbage). Keep one layout throughout.
        quantised.support_avx512bf16_for_cpu = False
    quantised.load_state_dict(linear.state_dict())
    quantised = quantised.to(device)  # bitsandbytes quantises when the weight is moved
    if has_bias:
        quantised.bias.requires_grad_(False)
    return quantised


def _int8_weight_linear_class(bnb: ModuleType) -> type:
    """bitsandbytes' int8 layer, computing with its dequantised weight instead of LLM.int8's int8 matmul.

    LLM.int8 also rounds every input to 8 bits, which no merged float weight can reproduce (on SmolLM2
    the export then agreed with the trained model on 82 % of top-1 tokens). Computing x·dequant(W)ᵀ
    keeps the memory of int8 weights and makes the trained model exactly the one that is exported.
    """
    global _INT8_WEIGHT_LINEAR
    if _INT8_WEIGHT_LINEAR is None:
        class Int8WeightLinear(bnb.nn.Linear8bitLt):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                output = _DequantisedMatmul.apply(x, self)
                return output if self.bias is None else output + self.bias.to(output.dtype)

        _INT8_WEIGHT_LINEAR = Int8WeightLinear
    return _INT8_WEIGHT_LINEAR


_INT8_WEIGHT_LINEAR: type | None = None


class _DequantisedMatmul(torch.autograd.Function):
    """x·Wᵀ with W dequantised on the fly, again in backward: no float copy of W outlives the call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return x @ dequantised_rows(layer, slice(None)).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = dequantised_rows(ctx.layer, slice(None)).to(grad_output.dtype)
        return grad_output @ weight, None


def is_quantised(linear: nn.Module) -> bool:
    """Whether a projection (or PEFT's layer around it) holds a bitsandbytes weight."""
    weight = getattr(getattr(linear, "base_layer", linear), "weight", None)
    return hasattr(weight, "SCB") or hasattr(weight, "quant_state")


def dequantised_rows(linear: nn.Module, rows: slice) -> torch.Tensor:
    """Rows of a bitsandbytes layer's weight in float32, shape (rows, in), without the whole matrix."""
    weight = linear.weight
    if hasattr(weight, "SCB"):  # int8, one scale per row: W = CB · SCB / 127
        # The first forward pass moves the row scales from the weight into the layer's state.
        scales = weight.SCB if weight.SCB is not None else linear.state.SCB
        return weight.data[rows].float() * (scales[rows].float() / 127.0)[:, None]
    state = weight.quant_state
    out_features, in_features = state.shape
    start, stop, _ = rows.indices(out_features)
    if in_features % state.blocksize or state.nested:  # rows do not start on a block: whole matrix
        return _dequantised_4bit(weight.data, state)[start:stop]
    from bitsandbytes.functional import QuantState

    blocks = slice(start * in_features // state.blocksize, stop * in_features // state.blocksize)
    packed = weight.data.view(-1)[start * in_features // 2: stop * in_features // 2]
    part = QuantState(state.absmax[blocks], shape=torch.Size((stop - start, in_features)), code=state.code,
                      blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
    return _dequantised_4bit(packed, part)


def _dequantised_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(packed, state).float()


def dequantise_frozen_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every bitsandbytes layer under ``model`` by a plain ``dtype`` nn.Linear with its dequantised weight."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__module__.startswith("bitsandbytes") and is_quantised(child):
                setattr(parent, name, _plain_linear(child, dtype))
    for module in model.modules():
        for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit"):
            if getattr(module, flag, False) is True:
                setattr(module, flag, False)


def _plain_linear(quantised: nn.Module, dtype: torch.dtype) -> nn.Linear:
    return plain_linear(dequantised_rows(quantised, slice(0, quantised.out_features)), quantised.bias, dtype)


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen ``dtype`` nn.Linear holding ``weight`` (out, in) and ``bias``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return linear


