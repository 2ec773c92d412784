"""Masks zero exactly what physically removing a unit removes, for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks, removed_parameters
from tests.conftest import TINY_CONFIGS, build_tiny_model


def _rows(kept_heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in kept_heads for i in range(head_dim)])


def _shrunk_by_hand(model, kept_q: list[int], kept_kv: list[int], kept_ffn: torch.Tensor):
    """A smaller model whose weights are the big one's with rows/columns deleted by index."""
    shape = LayerShape.from_config(model.config)
    config = model.config.__class__(**{**model.config.to_dict(), "num_attention_heads": len(kept_q),
                                       "num_key_value_heads": len(kept_kv),
                                       "intermediate_size": len(kept_ffn), "head_dim": shape.head_dim})
    small = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    q_rows, kv_rows = _rows(kept_q, shape.head_dim), _rows(kept_kv, shape.head_dim)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".q_proj." in name:
            tensor = tensor[q_rows]
        elif ".k_proj." in name or ".v_proj." in name:
            tensor = tensor[kv_rows]
        elif "o_proj.weight" in name:
            tensor = tensor[:, q_rows]
        elif "gate_proj" in name or "up_proj" in name:
            tensor = tensor[kept_ffn]
        elif "down_proj.weight" in name:
            tensor = tensor[:, kept_ffn]
        state[name] = tensor
    small.load_state_dict(state)
    return small


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
def test_masked_model_equals_model_with_units_deleted_by_hand(family, granularity):
    model = build_tiny_model(family)
    if family == "qwen2":  # make the q/k/v biases matter
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.data.normal_(0, 0.5)
    shape = LayerShape.from_config(model.config)  # 4 query heads over 2 KV heads
    masks = ModelMasks.full(shape, model.config.num_hidden_layers)
    if granularity == "kv_group":
        kept_q, kept_kv = [2, 3], [1]  # KV group 0 goes with its two query heads
    else:
        kept_q, kept_kv = [1, 2], [0, 1]  # one query head per KV group
    kept_ffn = torch.arange(0, shape.intermediate_size, 3)
    for layer in masks.layers:
        layer.heads.zero_()
        layer.heads[kept_q] = True
        layer.ffn.zero_()
        layer.ffn[kept_ffn] = True
        assert layer.kv_heads(shape).nonzero().flatten().tolist() == kept_kv
    small = _shrunk_by_hand(model, kept_q, kept_kv, kept_ffn)

    masks.attach(model, spec_for(model.config))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked, deleted = model(ids).logits, small(ids).logits
    assert torch.allclose(masked, deleted, atol=1e-5, rtol=1e-5)

    bias = family == "qwen2"
    removed = removed_parameters(masks, shape, attention_bias=bias, mlp_bias=False)
    assert removed == model.num_parameters() - small.num_parameters()


def test_detached_masks_leave_the_model_unchanged(tiny_llama):
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        before = tiny_llama(ids).logits
    masks = ModelMasks.full(LayerShape.from_config(tiny_llama.config), tiny_llama.config.num_hidden_layers)
    masks.layers[0].ffn[:5] = False
    masks.attach(tiny_llama, spec_for(tiny_llama.config))
    masks.detach()
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, before)


def test_masks_round_trip_through_safetensors(tmp_path, tiny_llama):
    shape = LayerShape.from_config(tiny_llama.config)
    masks = ModelMasks.full(shape, 4)
    masks.layers[2].heads[1] = False
    masks.layers[3].ffn[7] = False
    masks.save(tmp_path / "masks.safetensors")
    loaded = ModelMasks.load(tmp_path / "masks.safetensors", shape, 4)
    assert loaded.kept_counts() == masks.kept_counts()
    assert torch.equal(loaded.layers[3].ffn, masks.layers[3].ffn)
