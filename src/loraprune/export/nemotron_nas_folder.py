"""A pruned Llama as a Nemotron-NAS (DeciLM) folder: per-layer widths that vLLM and transformers load.

Reads the merged model and its masks directly (no slicing to one width): each layer keeps its own
KV heads and FFN width; pruned query heads become zero slots, which change nothing (see layout).
The folder ships its modeling code; transformers_writer.py writes it for per-layer masks and --format nemotron-nas.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.export.nemotron_nas_layout import PAD, BlockLayout, plan_layout
from loraprune.export.nemotron_nas_reader import WEIGHTS_NAME, auto_map, shipped_code
from loraprune.export.slicing import layers_report
from loraprune.export.writer import REPORT_NAME
from loraprune.models import ArchSpec, decoder_layers
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks

FORMAT_NAME = "nemotron-nas"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def checked_layouts(config, masks: ModelMasks, shape: LayerShape) -> list[BlockLayout]:
    """Each layer's slots, after refusing a model or masks this folder cannot hold."""
    check_exportable(config)
    if len(masks.layers) != config.num_hidden_layers:
        raise LoraPruneError(f"masks cover {len(masks.layers)} layers but the model has "
                             f"{config.num_hidden_layers}; export with the masks of this model's run")
    layouts = plan_layout(masks, shape)
    if masks.means is not None and any(layout.attention_no_op or layout.ffn_no_op for layout in layouts):
        raise LoraPruneError("with --bias-compensation every layer must keep an attention head and an "
                             "FFN channel (a skipped block cannot hold a bias); lower the sparsity")
    return layouts


def write_folder(folder: Path, merged: PreTrainedModel, masks: ModelMasks, spec: ArchSpec, tokenizer) -> dict:
    """Write weights, config, modeling code and tokenizer into ``folder``; returns the report's export part."""
    shape = LayerShape.from_config(merged.config)
    layouts = plan_layout(masks, shape)  # the writer's refuse() checked them on the unmerged model
    tensors = padded_state_dict(merged, layouts, spec)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = nemotron_nas_config(merged.config, layouts, shape, merged.dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, code in shipped_code().items():
        (folder / name).write_text(code)
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder_summary(masks, layouts, shape, tensors)


def check_exportable(config) -> None:
    """Refuse, before anything is written, a model this format cannot express."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LoraPruneError(f"--format {FORMAT_NAME} writes Llama-style models only (got '{model_type}'); "
                             "use the transformers format for this model")
    if getattr(config, "sliding_window", None) is not None:
        raise LoraPruneError(f"--format {FORMAT_NAME} has no sliding-window attention; this model uses "
                             "one, so use the transformers format")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LoraPruneError(f"--format {FORMAT_NAME} is written without biases and this model has some; "
                             "use the transformers format")
    if config.hidden_act != "silu":
        raise LoraPruneError(f"--format {FORMAT_NAME} runs in vLLM's Llama MLP, which is SiLU-gated only "
                             f"(this model uses {config.hidden_act!r}); use the transformers format")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise LoraPruneError(f"--format {FORMAT_NAME} needs pretraining_tp 1 (got {config.pretraining_tp})")


def padded_state_dict(model: PreTrainedModel, layouts: list[BlockLayout], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensor names; q/k/v/o padded to the layout's slots, FFN cut to kept channels."""
    config = model.config
    head_dim = LayerShape.from_config(config).head_dim
    tensors = {"model.embed_tokens.weight": model.get_input_embeddings().weight,
               "model.norm.weight": model.get_submodule("model.norm").weight}
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = model.get_output_embeddings().weight
    for index, (layer, layout) in enumerate(zip(decoder_layers(model, spec), layouts)):
        prefix = f"model.layers.{index}"
        attention, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        if not layout.attention_no_op:
            queries, kv = list(layout.query_sources), list(layout.kv_sources)
            tensors[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.weight
            tensors[f"{prefix}.self_attn.q_proj.weight"] = _gather(_weight(attention, spec.q_proj), queries, head_dim, 0)
            tensors[f"{prefix}.self_attn.k_proj.weight"] = _gather(_weight(attention, spec.k_proj), kv, head_dim, 0)
            tensors[f"{prefix}.self_attn.v_proj.weight"] = _gather(_weight(attention, spec.v_proj), kv, head_dim, 0)
            tensors[f"{prefix}.self_attn.o_proj.weight"] = _gather(_weight(attention, spec.o_proj), queries, head_dim, 1)
            if config.attention_bias:  # bias compensation: zeros on q/k/v, the removed heads' mean on o
                for name, sources in ((spec.q_proj, queries), (spec.k_proj, kv), (spec.v_proj, kv)):
                    tensors[f"{prefix}.self_attn.{name}.bias"] = _gather(_bias(attention, name), sources, head_dim, 0)
                tensors[f"{prefix}.self_attn.o_proj.bias"] = _bias(attention, spec.o_proj)
        if not layout.ffn_no_op:
            channels = list(layout.ffn_sources)
            tensors[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            tensors[f"{prefix}.mlp.gate_proj.weight"] = _gather(_weight(mlp, spec.gate_proj), channels, 1, 0)
            tensors[f"{prefix}.mlp.up_proj.weight"] = _gather(_weight(mlp, spec.up_proj), channels, 1, 0)
            tensors[f"{prefix}.mlp.down_proj.weight"] = _gather(_weight(mlp, spec.down_proj), channels, 1, 1)
            if config.mlp_bias:
                for name in (spec.gate_proj, spec.up_proj):
                    tensors[f"{prefix}.mlp.{name}.bias"] = _gather(_bias(mlp, name), channels, 1, 0)
                tensors[f"{prefix}.mlp.down_proj.bias"] = _bias(mlp, spec.down_proj)
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    linear = getattr(module, name)
    if not isinstance(linear, nn.Linear):
        raise LoraPruneError(f"cannot export a {type(linear).__name__}; --format {FORMAT_NAME} needs plain "
                             "nn.Linear projections (merge LoRA and load the model unquantized)")
    return linear.weight.detach()


def _bias(module: nn.Module, name: str) -> torch.Tensor:
    return getattr(module, name).bias.detach()


def _gather(weight: torch.Tensor, sources: list[int], width: int, dim: int) -> torch.Tensor:
    """Blocks of `width` rows (dim 0) or columns (dim 1) in `sources` order; PAD blocks are zeros."""
    blocks = weight.unflatten(dim, (-1, width))
    out_shape = list(blocks.shape)
    out_shape[dim] = len(sources)
    out = torch.zeros(out_shape, dtype=weight.dtype, device=weight.device)
    slots = [slot for slot, source in enumerate(sources) if source != PAD]
    kept = torch.tensor([sources[slot] for slot in slots], dtype=torch.long, device=weight.device)
    out.index_copy_(dim, torch.tensor(slots, dtype=torch.long, device=weight.device),
                    blocks.index_select(dim, kept))
    return out.flatten(dim, dim + 1)


def nemotron_nas_config(config, layouts: list[BlockLayout], shape: LayerShape, dtype: torch.dtype) -> dict:
    """config.json of the written folder: DeciLM's fields plus one block config per layer."""
    global_heads = next(len(layout.query_sources) for layout in layouts if not layout.attention_no_op)
    rope_parameters = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default",
                                                                        "rope_theta": config.rope_theta})
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": FORMAT_NAME,
        "auto_map": auto_map(),
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": global_heads,
        "head_dim": shape.head_dim,
        "vocab_size": config.vocab_size,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": rope_parameters["rope_theta"],
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "attention_bias": bool(getattr(config, "attention_bias", False)),
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": getattr(config, "pad_token_id", None),
        "dtype": str(dtype).removeprefix("torch."),
        "block_configs": [_block_config(layout) for layout in layouts],
    }


def _block_config(layout: BlockLayout) -> dict:
    attention = ({"no_op": True, "replace_with_linear": False} if layout.attention_no_op else
                 {"no_op": False, "replace_with_linear": False, "n_heads_in_group": layout.heads_in_group})
    ffn = ({"no_op": True, "replace_with_linear": False} if layout.ffn_no_op else
           {"no_op": False, "replace_with_linear": False, "intermediate_size": len(layout.ffn_sources)})
    return {"attention": attention, "ffn": ffn}


def folder_summary(masks: ModelMasks, layouts: list[BlockLayout], shape: LayerShape,
                   tensors: dict[str, torch.Tensor]) -> dict:
    """Widths, real parameters and zero padding of the written folder."""
    stored = sum(t.numel() for t in tensors.values())
    zero_padding = sum(
        (layout.query_sources.count(PAD) * 2 + layout.kv_sources.count(PAD) * 2) * shape.head_dim * shape.hidden_size
        for layout in layouts if not layout.attention_no_op)
    global_heads = next(len(layout.query_sources) for layout in layouts if not layout.attention_no_op)
    return {
        "format": FORMAT_NAME,
        "architecture": "DeciLMForCausalLM",
        "config": {"hidden_size": shape.hidden_size, "num_attention_heads": global_heads,
                   "head_dim": shape.head_dim, "num_hidden_layers": len(layouts)},
        "parameters_after": stored - zero_padding,
        "parameters_stored": stored,
        "zero_padding_parameters": zero_padding,
        "layers": [{**kept, "query_slots": list(layout.query_sources), "kv_slots": list(layout.kv_sources)}
                   for kept, layout in zip(layers_report(masks, shape), layouts)],
    }


def model_card(report: dict) -> str:
    """A short README.md: what was pruned, and how to run it in vLLM."""
    export = report["export"]
    removed = 1 - export["parameters_after"] / export["parameters_before"]
    source = report.get("source_model", "the source model")
    widths = ", ".join(f"{layer['heads']}/{layer['kv_heads']}/{layer['ffn']}" for layer in export["layers"])
    return (
        f"# Pruned with loraprune (Nemotron-NAS / DeciLM format)\n\n"
        f"Structured pruning of {source} with LoRAPrune: whole attention heads and FFN channels were "
        f"removed per layer and the LoRA weights merged.\n\n"
        f"- parameters: {export['parameters_before']:,} -> {export['parameters_after']:,} "
        f"({removed:.1%} removed; {export['zero_padding_parameters']:,} more are stored as zero padding "
        f"because this format has one query-head count, {export['config']['num_attention_heads']}, for all layers)\n"
        f"- per layer (query heads / KV heads / FFN channels): {widths}\n\n"
        "Load it with transformers: the folder ships its modeling code (`modeling_decilm.py`), so no "
        "loraprune is needed, only `trust_remote_code`:\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)\n'
        "```\n\n"
        "or run it with vLLM (`DeciLMForCausalLM`):\n\n"
        "```python\n"
        "from vllm import LLM\n"
        'llm = LLM("path/to/this/folder", trust_remote_code=True)\n'
        "```\n\n"
        f"The full run report is in `{REPORT_NAME}`.\n"
    )
