"""Slicing keeps exactly the kept rows and columns, fixes the config, and re-types Llama when it must."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralForCausalLM

from loraprune.errors import LoraPruneError
from loraprune.export.slicing import merge_lora, slice_model, uniform_widths
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask, ModelMasks
from tests.conftest import TINY_SIZES, build_tiny_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = LayerShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)


def layer_masks(kept_heads: list[list[int]], ffn_kept: int, num_heads: int = 4, seed: int = 0) -> ModelMasks:
    """Per layer: keep the listed query heads and ``ffn_kept`` random FFN channels of 128."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for heads in kept_heads:
        head_mask = torch.zeros(num_heads, dtype=torch.bool)
        head_mask[heads] = True
        ffn = torch.zeros(128, dtype=torch.bool)
        ffn[torch.randperm(128, generator=generator)[:ffn_kept]] = True
        layers.append(LayerMask(head_mask, ffn))
    return ModelMasks(layers)


def rows_of(heads: torch.Tensor, head_dim: int = 16) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads.nonzero().flatten().tolist() for i in range(head_dim)])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kept_heads, heads, kv_heads", [
    ([[0, 2], [1, 3], [1, 2], [0, 3]], 2, 2),  # one query head of each KV group, a different one per layer
    ([[2, 3], [0, 1], [0, 1], [2, 3]], 2, 1),  # a whole KV group
])
def test_sliced_qwen2_keeps_exactly_the_selected_rows_columns_and_biases(kept_heads, heads, kv_heads):
    model = build_tiny_model("qwen2")
    with torch.no_grad():  # q/k/v biases are zero at init; make them tell rows apart
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    masks = layer_masks(kept_heads, ffn_kept=100)

    sliced = slice_model(model, masks, spec_for(model.config))

    assert (sliced.config.num_attention_heads, sliced.config.num_key_value_heads) == (heads, kv_heads)
    assert (sliced.config.intermediate_size, sliced.config.head_dim) == (100, 16)
    for index, (layer, mask) in enumerate(zip(sliced.model.layers, masks.layers)):
        prefix = f"model.layers.{index}."
        old = {name.removeprefix(prefix): tensor for name, tensor in before.items() if name.startswith(prefix)}
        q_rows, kv_rows = rows_of(mask.heads), rows_of(mask.kv_heads(SHAPE))
        channels = mask.ffn.nonzero().flatten()
        attention, mlp = layer.self_attn, layer.mlp
        assert q_rows.numel() == 16 * heads and kv_rows.numel() == 16 * kv_heads
        assert torch.equal(attention.q_proj.weight, old["self_attn.q_proj.weight"].index_select(0, q_rows))
        assert torch.equal(attention.q_proj.bias, old["self_attn.q_proj.bias"].index_select(0, q_rows))
        for name in ("k_proj", "v_proj"):
            assert torch.equal(getattr(attention, name).weight, old[f"self_attn.{name}.weight"].index_select(0, kv_rows))
            assert torch.equal(getattr(attention, name).bias, old[f"self_attn.{name}.bias"].index_select(0, kv_rows))
        assert torch.equal(attention.o_proj.weight, old["self_attn.o_proj.weight"].index_select(1, q_rows))
        assert attention.o_proj.bias is None
        assert torch.equal(mlp.gate_proj.weight, old["mlp.gate_proj.weight"].index_select(0, channels))
        assert torch.equal(mlp.up_proj.weight, old["mlp.up_proj.weight"].index_select(0, channels))
        assert torch.equal(mlp.down_proj.weight, old["mlp.down_proj.weight"].index_select(1, channels))
        assert attention.num_key_value_groups == heads // kv_heads


def test_slice_model_refuses_a_peft_model_and_names_merge_lora(tiny_llama):
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=PROJECTIONS))
    masks = layer_masks([[0, 2]] * 4, ffn_kept=64)
    with pytest.raises(LoraPruneError, match="merge_lora"):
        slice_model(peft_model, masks, spec_for(tiny_llama.config))
    assert tiny_llama.model.layers[0].self_attn.q_proj.base_layer.weight.shape == (64, 64)  # nothing was cut


def test_uniform_widths_returns_the_one_width_of_all_layers():
    assert uniform_widths(layer_masks([[0, 2], [1, 3], [0, 3], [1, 2]], ffn_kept=70), SHAPE) == (2, 2, 70)


def test_uniform_widths_refuses_layers_that_keep_different_widths():
    masks = layer_masks([[0, 2]] * 4, ffn_kept=64)
    masks.layers[3].ffn[:] = True
    with pytest.raises(LoraPruneError, match="same count per layer"):
        uniform_widths(masks, SHAPE)
    masks = layer_masks([[0, 2]] * 3 + [[0, 1, 2, 3]], ffn_kept=64)
    with pytest.raises(LoraPruneError, match=r"\(4, 2, 64\)"):
        uniform_widths(masks, SHAPE)


def test_uniform_widths_refuses_kv_groups_that_keep_different_query_head_counts():
    masks = layer_masks([[0, 2, 3]] * 4, ffn_kept=64)  # KV group 0 keeps 1 query head, group 1 keeps 2
    with pytest.raises(LoraPruneError, match=r"\(\[1, 2\]\).*same count per KV group"):
        uniform_widths(masks, SHAPE)


def test_merge_lora_folds_the_adapters_into_a_plain_model_with_the_same_output():
    base_logits = logits(build_tiny_model("llama"), IDS)
    peft_model = get_peft_model(build_tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS,
                                                                     init_lora_weights=False)).eval()
    adapted_logits = logits(peft_model, IDS)
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapters change the output

    merged = merge_lora(peft_model)

    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not [name for name, _ in merged.named_modules() if "lora_" in name]
    assert torch.allclose(logits(merged, IDS), adapted_logits, atol=1e-5, rtol=0)


def test_merge_lora_passes_a_plain_model_through(tiny_llama):
    weight = tiny_llama.model.layers[0].mlp.up_proj.weight.clone()
    assert merge_lora(tiny_llama) is tiny_llama
    assert torch.equal(tiny_llama.model.layers[0].mlp.up_proj.weight, weight)


def test_llama_sliced_to_heads_not_dividing_hidden_size_comes_back_as_the_same_mistral():
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_SIZES, "num_key_value_heads": 1})  # 4 query heads share one KV head
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    masks = layer_masks([[0, 1, 2], [1, 2, 3], [0, 2, 3], [0, 1, 3]], ffn_kept=96)  # 3 heads: 64 % 3 != 0
    spec = spec_for(config)
    masks.attach(model, spec)
    masked_logits = logits(model, IDS)
    masks.detach()

    sliced = slice_model(model, masks, spec)

    assert isinstance(sliced, MistralForCausalLM)
    assert (sliced.config.num_attention_heads, sliced.config.num_key_value_heads) == (3, 1)
    assert (sliced.config.head_dim, sliced.config.intermediate_size, sliced.config.sliding_window) == (16, 96, None)
    assert sliced.model.layers[0].self_attn.q_proj.weight.shape == (48, 64)
    assert torch.allclose(logits(sliced, IDS), masked_logits, atol=1e-5, rtol=0)
