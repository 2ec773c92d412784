"""FLAP's fluctuation criterion: Var(x_j)·‖W[:, j]‖² per feature, summed per unit, standardised across layers."""

from __future__ import annotations

import pytest
import torch

from loraprune.config import PruneConfig
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.target import UnitSizes, solve_model_target
from loraprune.training.oneshot import calibration_scores, one_shot_masks


def _blocks() -> torch.Tensor:
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))


def _fluctuations(model, blocks: torch.Tensor, unit: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hand-computed per-unit fluctuation of every layer: (attention units, FFN channels)."""
    shape, seen = LayerShape.from_config(model.config), {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for kind, module in (("attention", layer.self_attn.o_proj), ("ffn", layer.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(
                lambda m, inputs, key=(index, kind): seen.setdefault(key, []).append(inputs[0].reshape(-1, inputs[0].shape[-1]))))
    with torch.no_grad():
        for block in blocks:
            model(input_ids=block[None])
    for handle in handles:
        handle.remove()
    attention, ffn = [], []
    for index, layer in enumerate(model.model.layers):
        for kind, module, out in (("attention", layer.self_attn.o_proj, attention), ("ffn", layer.mlp.down_proj, ffn)):
            tokens = torch.cat(seen[(index, kind)]).double()
            per_feature = tokens.var(dim=0, unbiased=False) * module.weight.double().square().sum(dim=0)
            if kind == "attention":
                per_feature = per_feature.view(shape.num_heads, shape.head_dim).sum(dim=1)
                if unit == "kv_group":
                    per_feature = per_feature.view(shape.num_kv_heads, shape.queries_per_kv).sum(dim=1)
            out.append(per_feature)
    return attention, ffn


def _standardise(values: list[torch.Tensor]) -> torch.Tensor:
    joined = torch.cat(values)
    return (joined - joined.mean()) / joined.std()


@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_flap_scores_per_parameter_are_the_standardised_fluctuations(tiny_llama, unit):
    config = PruneConfig(criterion="flap", attention_unit=unit, allocation="global", sparsity=0.3)
    target = solve_model_target(tiny_llama, config)
    scores = calibration_scores(tiny_llama, _blocks(), config, target)
    sizes = UnitSizes.of(LayerShape.from_config(tiny_llama.config), unit, False, False)
    per_parameter_attention = torch.cat([scores[i].attention.double() / sizes.attention_unit for i in sorted(scores)])
    per_parameter_ffn = torch.cat([scores[i].ffn.double() / sizes.ffn_channel for i in sorted(scores)])
    attention, ffn = _fluctuations(tiny_llama, _blocks(), unit)
    shift = per_parameter_ffn - _standardise(ffn)  # one shift for both kinds: they compete on one scale
    torch.testing.assert_close(shift, torch.full_like(shift, float(shift[0])), rtol=0, atol=1e-4)
    torch.testing.assert_close(per_parameter_attention - _standardise(attention),
                               torch.full_like(per_parameter_attention, float(shift[0])), rtol=0, atol=1e-4)
    assert (per_parameter_ffn > 0).all() and (per_parameter_attention > 0).all()


def test_one_shot_flap_with_compensation_keeps_the_calibration_means(tiny_llama):
    config = PruneConfig(criterion="flap", allocation="global", sparsity=0.3, bias_compensation=True)
    masks = one_shot_masks(tiny_llama, _blocks(), config, solve_model_target(tiny_llama, config))
    assert any((~m.ffn).any() for m in masks.layers)
    tokens = _blocks().numel()
    assert all(torch.equal(means.ffn.counts, torch.full_like(means.ffn.counts, tokens)) for means in masks.means)
