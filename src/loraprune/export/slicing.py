"""Turn a masked LoRA model into a smaller dense one: merge LoRA, cut pruned rows and columns.

Slicing is pure index_select on weights, so the sliced model computes what the masked model did.
Layers may keep different widths (``per_layer``); a format that has one width per model refuses them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import MistralConfig, MistralForCausalLM, PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.models import ArchSpec, decoder_layers, unwrap
from loraprune.models.quantised import dequantise_frozen_base, is_quantised, plain_linear
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks
from loraprune.pruning.scorers.weights import effective_weight

# Llama fields that Mistral does not have; a Llama without biases is a Mistral without a window.
_LLAMA_ONLY_FIELDS = ("attention_bias", "mlp_bias", "pretraining_tp")


def merge_lora(model: nn.Module) -> PreTrainedModel:
    """Fold LoRA adapters into the base weights (in place); a plain model passes through.

    A quantised base is merged into its dequantised weights: the writers need plain nn.Linear.
    """
    _merge_into_dequantised(model)
    if callable(getattr(model, "merge_and_unload", None)):
        return model.merge_and_unload()
    return unwrap(model)


def _merge_into_dequantised(model: nn.Module) -> None:
    """Replace LoRA layers around quantised projections by plain nn.Linear of W + s·B·A, then the rest."""
    dtype = unwrap(model).get_input_embeddings().weight.dtype
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "base_layer") and is_quantised(child):
                setattr(parent, name, plain_linear(effective_weight(child), child.base_layer.bias, dtype))
    dequantise_frozen_base(model, dtype)


class LayerWidths(NamedTuple):
    """What one sliced decoder layer keeps: query heads, key/value heads, FFN channels."""

    heads: int
    kv_heads: int
    ffn: int


def slice_model(model: PreTrainedModel, masks: ModelMasks, spec: ArchSpec,
                per_layer: bool = False) -> PreTrainedModel:
    """Remove pruned heads and FFN channels in place; returns the model (a new one if re-typed).

    With ``per_layer`` each layer may keep its own widths (each attention module gets its own
    ``num_key_value_groups``); the config then still states the source widths, and
    ``sliced_layer_widths`` reads the real ones. Otherwise every layer must keep the same widths.
    """
    if callable(getattr(model, "merge_and_unload", None)):
        raise LoraPruneError("slice_model needs a merged model; call merge_lora(model) first")
    shape = LayerShape.from_config(model.config)
    layers = decoder_layers(model, spec)
    if len(layers) != len(masks.layers):
        raise LoraPruneError(f"masks cover {len(masks.layers)} layers but the model has "
                             f"{len(layers)}; export with the masks of this model's run")
    widths = layer_widths(masks, shape) if per_layer else [uniform_widths(masks, shape)] * len(layers)
    for layer, mask in zip(layers, masks.layers):
        _slice_attention(getattr(layer, spec.attention), mask.heads, mask.kv_heads(shape), shape, spec)
        _slice_mlp(getattr(layer, spec.mlp), mask.ffn, spec)
    if len(set(widths)) > 1:
        return model
    config = model.config
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = widths[0]
    config.head_dim = shape.head_dim
    if _config_accepts(config):
        return model
    return as_mistral(model)


@torch.no_grad()
def fold_compensation(model: PreTrainedModel, masks: ModelMasks, spec: ArchSpec) -> None:
    """Fold removed units' mean outputs into the biases of o_proj / down_proj, in place (merged model).

    The masked model feeds o_proj the mean of a removed unit; W[:, removed] @ mean in the bias does
    the same once the columns are gone. Llama's config has one flag for all four attention
    projections and one for all three MLP ones, so q/k/v and gate/up get zero biases.
    """
    shape = LayerShape.from_config(model.config)
    for layer, mask, means in zip(decoder_layers(model, spec), masks.layers, masks.means):
        attention, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        removed_features = ~mask.heads.repeat_interleave(shape.head_dim)
        for module, projection, removed, unit_means in (
                (attention, spec.o_proj, removed_features, means.attention),
                (mlp, spec.down_proj, ~mask.ffn, means.ffn)):
            linear = getattr(module, projection)
            kept_mean = unit_means.mean().to(linear.weight.device) * removed.to(linear.weight.device)
            compensation = linear.weight.float() @ kept_mean  # (out,)
            _add_bias(module, projection, compensation)
        for module, projection in ((attention, spec.q_proj), (attention, spec.k_proj), (attention, spec.v_proj),
                                   (mlp, spec.gate_proj), (mlp, spec.up_proj)):
            _add_bias(module, projection, None)
    model.config.attention_bias = True
    model.config.mlp_bias = True


def _add_bias(module: nn.Module, name: str, values: torch.Tensor | None) -> None:
    """Add ``values`` to the bias of ``module.name`` (made, zero, if it had none); None: just make sure it has one."""
    linear = getattr(module, name)
    if not isinstance(linear, nn.Linear):
        raise LoraPruneError(f"cannot fold bias compensation into a {type(linear).__name__}; export needs "
                             "plain nn.Linear projections (merge LoRA and load the model unquantized)")
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=False)
    if values is not None:
        linear.bias += values.to(linear.bias.dtype)


def layer_widths(masks: ModelMasks, shape: LayerShape) -> list[LayerWidths]:
    """Kept widths of every layer, or a LoraPruneError for a layer no runtime can run."""
    widths = []
    for index, mask in enumerate(masks.layers):
        per_kv = mask.heads.view(shape.num_kv_heads, shape.queries_per_kv).sum(dim=1)
        kept_per_kv = set(per_kv[per_kv > 0].tolist())
        if len(kept_per_kv) > 1:
            raise LoraPruneError(
                f"layer {index}: kept key/value heads keep different numbers of query heads "
                f"({sorted(kept_per_kv)}); grouped-query attention needs the same count per KV group, "
                "so prune whole KV groups (--attention-unit kv_group)")
        heads, ffn = int(mask.heads.sum()), int(mask.ffn.sum())
        # A layer without heads or FFN channels would need a runtime that skips the block; the
        # transformers modules cannot, and llama.cpp's deci graph drops the attention output of
        # a layer whose FFN width is 0 (see CONTRIBUTING, "Add an export format").
        if heads == 0 or ffn == 0:
            raise LoraPruneError(f"layer {index} keeps no attention heads or no FFN channels; "
                                 "lower the target sparsity or keep that layer (--skip-first/--skip-last)")
        widths.append(LayerWidths(heads, int(mask.kv_heads(shape).sum()), ffn))
    return widths


def layers_report(masks: ModelMasks, shape: LayerShape) -> list[dict]:
    """Per layer: the kept counts and which query heads and FFN channels were kept."""
    return [{"heads": int(m.heads.sum()), "kv_heads": int(m.kv_heads(shape).sum()), "ffn": int(m.ffn.sum()),
             "heads_kept": m.heads.nonzero().flatten().tolist(), "ffn_kept": m.ffn.nonzero().flatten().tolist()}
            for m in masks.layers]


def uniform_widths(masks: ModelMasks, shape: LayerShape) -> LayerWidths:
    """The one width every layer keeps, or a LoraPruneError (a transformers config has one width)."""
    widths = layer_widths(masks, shape)
    if len(set(widths)) != 1:
        raise LoraPruneError(
            f"layers keep different widths {sorted(set(map(tuple, widths)))} (heads, kv heads, ffn); a "
            "standard checkpoint has one config for all layers, so prune with the same count per layer, "
            "or export with --format gguf, which stores per-layer widths")
    return widths[0]


def sliced_layer_widths(model: nn.Module, spec: ArchSpec) -> list[LayerWidths]:
    """Widths of every layer of a sliced model, read from its projections' shapes."""
    head_dim = LayerShape.from_config(unwrap(model).config).head_dim
    widths = []
    for layer in decoder_layers(model, spec):
        attention, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        widths.append(LayerWidths(getattr(attention, spec.q_proj).out_features // head_dim,
                                  getattr(attention, spec.k_proj).out_features // head_dim,
                                  getattr(mlp, spec.up_proj).out_features))
    return widths


def _slice_attention(attention: nn.Module, heads: torch.Tensor, kv_heads: torch.Tensor,
                     shape: LayerShape, spec: ArchSpec) -> None:
    """Keep the rows of q (kept query heads), k and v (kept kv heads) and the columns of o."""
    query_index = _unit_index(heads, shape.head_dim)
    kv_index = _unit_index(kv_heads, shape.head_dim)
    for name, index in ((spec.q_proj, query_index), (spec.k_proj, kv_index), (spec.v_proj, kv_index)):
        setattr(attention, name, _select(getattr(attention, name), rows=index))
    setattr(attention, spec.o_proj, _select(getattr(attention, spec.o_proj), columns=query_index))
    num_heads, num_kv = int(heads.sum()), int(kv_heads.sum())
    attention.num_key_value_groups = num_heads // num_kv
    # transformers 5 keeps only num_key_value_groups; older or custom modules also store counts.
    for attribute, value in (("num_heads", num_heads), ("num_attention_heads", num_heads),
                             ("num_key_value_heads", num_kv)):
        if hasattr(attention, attribute):
            setattr(attention, attribute, value)


def _slice_mlp(mlp: nn.Module, channels: torch.Tensor, spec: ArchSpec) -> None:
    """Keep the gate and up rows and the down columns of kept FFN channels."""
    index = _unit_index(channels, 1)
    setattr(mlp, spec.gate_proj, _select(getattr(mlp, spec.gate_proj), rows=index))
    setattr(mlp, spec.up_proj, _select(getattr(mlp, spec.up_proj), rows=index))
    setattr(mlp, spec.down_proj, _select(getattr(mlp, spec.down_proj), columns=index))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = index.numel()


def _unit_index(kept: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the rows (or columns) that belong to kept units of `width` rows each."""
    return torch.arange(kept.numel() * width).view(-1, width)[kept.bool().cpu()].flatten()


def _select(linear: nn.Module, rows: torch.Tensor | None = None,
            columns: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding the selected output rows / input columns of `linear`."""
    if not isinstance(linear, nn.Linear):
        raise LoraPruneError(f"cannot slice a {type(linear).__name__}; export needs plain nn.Linear "
                             "projections (merge LoRA and load the model unquantized)")
    weight, bias = linear.weight.detach(), linear.bias
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = bias.detach().index_select(0, rows.to(weight.device)) if bias is not None else None
    if columns is not None:
        weight = weight.index_select(1, columns.to(weight.device))
    sliced = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if bias is not None:
            sliced.bias.copy_(bias)
    sliced.train(linear.training)
    return sliced


def _config_accepts(config) -> bool:
    """Whether the config's own class accepts its (sliced) head counts and widths."""
    try:
        config.validate()
    except (StrictDataclassClassValidationError, ValueError, TypeError):
        return False
    return True


def as_mistral(model: PreTrainedModel) -> PreTrainedModel:
    """Re-type a sliced bias-free Llama whose head count LlamaConfig refuses as the same Mistral."""
    config = model.config
    if config.model_type != "llama":
        raise LoraPruneError(
            f"{type(config).__name__} refuses {config.num_attention_heads} heads of hidden size "
            f"{config.hidden_size}; prune to a head count that divides the hidden size")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LoraPruneError(
            f"LlamaConfig refuses {config.num_attention_heads} heads of hidden size "
            f"{config.hidden_size}, and this Llama has biases that Mistral cannot hold; prune to a "
            "head count that divides the hidden size")
    fields = {k: v for k, v in config.to_dict().items()
              if k not in _LLAMA_ONLY_FIELDS + ("model_type", "architectures", "transformers_version")}
    mistral_config = MistralConfig(**{**fields, "sliding_window": None})
    mistral_config._attn_implementation = config._attn_implementation
    mistral = MistralForCausalLM(mistral_config).to(dtype=model.dtype, device=model.device)
    # Same module tree and names as Llama: the state dict moves across unchanged.
    mistral.load_state_dict(model.state_dict(), strict=True)
    mistral.generation_config = model.generation_config
    mistral.train(model.training)
    return mistral
