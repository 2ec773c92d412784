"""Every criterion but random prunes a planted dead unit first: a KV group and an FFN channel whose
weights are all zero contribute nothing, so they must be the first to go."""

from __future__ import annotations

import pytest
import torch

from loraprune.config import PruneConfig
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.scorers import SCORERS
from loraprune.pruning.target import PruneTarget
from loraprune.training.oneshot import one_shot_masks

DEAD_LAYER, DEAD_KV_GROUP, DEAD_CHANNEL = 1, 1, 37


def _plant_dead_units(model) -> None:
    """Zero every weight of one KV group (its query heads too) and of one FFN channel."""
    shape = LayerShape.from_config(model.config)
    layer = model.model.layers[DEAD_LAYER]
    hd, per_kv = shape.head_dim, shape.queries_per_kv
    query_rows = slice(DEAD_KV_GROUP * per_kv * hd, (DEAD_KV_GROUP + 1) * per_kv * hd)
    kv_rows = slice(DEAD_KV_GROUP * hd, (DEAD_KV_GROUP + 1) * hd)
    with torch.no_grad():
        layer.self_attn.q_proj.weight[query_rows] = 0
        layer.self_attn.k_proj.weight[kv_rows] = 0
        layer.self_attn.v_proj.weight[kv_rows] = 0
        layer.self_attn.o_proj.weight[:, query_rows] = 0
        layer.mlp.gate_proj.weight[DEAD_CHANNEL] = 0
        layer.mlp.up_proj.weight[DEAD_CHANNEL] = 0
        layer.mlp.down_proj.weight[:, DEAD_CHANNEL] = 0


@pytest.mark.parametrize("criterion", sorted(set(SCORERS) - {"random"}))
def test_a_planted_dead_kv_group_and_ffn_channel_are_pruned_first(tiny_llama, criterion):
    _plant_dead_units(tiny_llama)
    target = PruneTarget(pruned_layers=(DEAD_LAYER,), attention_unit="kv_group", attention_units_removed=1,
                         ffn_channels_removed=1, total_parameters=1, removed_parameters=0)
    blocks = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(criterion=criterion)
    masks = one_shot_masks(tiny_llama, blocks, config, target)
    shape = LayerShape.from_config(tiny_llama.config)
    kept_groups = masks.layers[DEAD_LAYER].heads.view(shape.num_kv_heads, shape.queries_per_kv).any(dim=1)
    assert kept_groups.tolist() == [True, False]
    assert (~masks.layers[DEAD_LAYER].ffn).nonzero().flatten().tolist() == [DEAD_CHANNEL]
