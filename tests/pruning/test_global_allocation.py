"""Global allocation: one parameter budget, spent on the units with the least score per parameter."""

from __future__ import annotations

import pytest
import torch

from loraprune.config import PruneConfig
from loraprune.errors import LoraPruneError
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks
from loraprune.pruning.scores import LayerScores
from loraprune.pruning.selection import shrink_masks
from loraprune.pruning.target import GlobalTarget, UnitSizes, solve_target
from loraprune.training.recipe import train_while_pruning
from tests.pruning.test_schedule_target_selection import SMOLLM2, SMOLLM2_PARAMETERS

SHAPE = LayerShape(hidden_size=8, num_heads=6, num_kv_heads=3, head_dim=2, intermediate_size=12)
SIZES = UnitSizes.of(SHAPE, "kv_group", attention_bias=False, mlp_bias=False)  # a KV group: 96, a channel: 24


def global_target(budget: int, layers=(0, 1, 2), unit="kv_group", round_to=1, layer_cap=None) -> GlobalTarget:
    sizes = UnitSizes.of(SHAPE, unit, attention_bias=False, mlp_bias=False)
    return GlobalTarget(layers, unit, sizes, round_to, total_parameters=10_000, removed_parameters=budget,
                        layer_cap=layer_cap)


def removed(masks: ModelMasks, target: GlobalTarget) -> int:
    total = 0
    for index in target.pruned_layers:
        mask = masks.layers[index]
        attention = (~mask.kv_heads(SHAPE)).sum() if target.attention_unit == "kv_group" else (~mask.heads).sum()
        total += int(attention) * target.sizes.attention_unit + int((~mask.ffn).sum()) * target.sizes.ffn_channel
    return total


def scores_where_layer_zero_matters_least() -> dict[int, LayerScores]:
    ffn = torch.linspace(1, 2, 12)
    return {0: LayerScores(torch.tensor([0.1, 0.2, 0.3]), ffn * 0.01),
            1: LayerScores(torch.tensor([50.0, 60.0, 70.0]), ffn * 10),
            2: LayerScores(torch.tensor([80.0, 90.0, 60.0]), ffn * 100)}


def test_the_budget_goes_to_the_layer_whose_units_cost_least():
    target = global_target(budget=2 * 96 + 11 * 24 + 2 * 24)  # all layer 0 can give, and two channels
    masks = ModelMasks.full(SHAPE, 3)
    shrink_masks(masks, scores_where_layer_zero_matters_least(), SHAPE, target, 1.0)
    counts = masks.kept_counts()
    # Layer 0 is narrowed to its floors: one KV group (2 query heads) and one FFN channel.
    assert counts[0] == {"heads": 2, "ffn": 1}
    assert counts[1]["heads"] == 6 and counts[2]["heads"] == 6
    assert removed(masks, target) == target.removed_parameters
    # The rest came from layer 1's two cheapest channels: per parameter they cost less than its
    # cheapest KV group (10/24 and 10.9/24 against 50/96).
    assert masks.layers[1].ffn.tolist()[:2] == [False, False] and masks.layers[2].ffn.all()


def test_a_layer_cap_stops_the_cheapest_layer_and_the_budget_is_met_elsewhere():
    # A layer holds 3 KV groups of 96 and 12 channels of 24: 576 parameters; the cap is half of them.
    budget = 2 * 96 + 13 * 24
    uncapped, capped = ModelMasks.full(SHAPE, 3), ModelMasks.full(SHAPE, 3)
    shrink_masks(uncapped, scores_where_layer_zero_matters_least(), SHAPE, global_target(budget), 1.0)
    target = global_target(budget, layer_cap=288)
    for fraction in (0.5, 1.0):  # the cap holds across ramp steps too
        shrink_masks(capped, scores_where_layer_zero_matters_least(), SHAPE, target, fraction)
    per_layer = [removed(capped, global_target(0, layers=(i,))) for i in range(3)]
    assert removed(uncapped, global_target(0, layers=(0,))) > 288
    assert max(per_layer) <= 288 and per_layer[0] > 0
    assert 0 <= budget - sum(per_layer) < SIZES.ffn_channel


def test_a_layer_cap_too_low_for_the_sparsity_is_refused_naming_the_lowest_that_works():
    with pytest.raises(LoraPruneError, match=r"--max-layer-sparsity 0.1 .* raise it to 0\.2"):
        solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.2, allocation="global", max_layer_sparsity=0.1)
    capped = solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.2, allocation="global", max_layer_sparsity=0.4)
    assert capped.layer_cap is not None and capped.layer_cap * 30 >= capped.removed_parameters


@pytest.mark.parametrize(("settings", "message"), [
    ({"allocation": "uniform", "max_layer_sparsity": 0.5}, "--max-layer-sparsity caps global allocation"),
    ({"max_layer_sparsity": 0.0}, r"--max-layer-sparsity must be in \(0, 1\]"),
    ({"fisher_window": 0}, "--fisher-window must be a positive number of tokens"),
    ({"fisher_window": 16, "criterion": "lora"}, "--criterion lora has none: drop it or use --criterion fisher"),
])
def test_a_layer_cap_or_fisher_window_that_would_do_nothing_is_refused(settings, message):
    # The CLI turns these into one line and exit 2 like every other LoraPruneError (tests/test_bad_input.py).
    with pytest.raises(LoraPruneError, match=message):
        PruneConfig(**settings).validate()


def test_budget_is_met_to_within_one_ffn_channel_and_masks_never_grow():
    target = global_target(budget=700)
    masks = ModelMasks.full(SHAPE, 3)
    scores = scores_where_layer_zero_matters_least()
    previous = [m.ffn.clone() for m in masks.layers]
    for fraction in (0.2, 0.5, 0.9, 1.0):
        shrink_masks(masks, scores, SHAPE, target, fraction)
        assert 0 <= fraction * 700 - removed(masks, target) < SIZES.ffn_channel
        assert all(bool((~old & new).sum() == 0) for old, new in zip(previous, (m.ffn for m in masks.layers)))
        previous = [m.ffn.clone() for m in masks.layers]
        # Reversed scores must not bring anything back.
        scores = {i: LayerScores(-s.attention, -s.ffn) for i, s in scores.items()}


def test_query_heads_leave_every_kv_group_of_a_layer_with_the_same_count():
    target = global_target(budget=3 * 32, unit="query_head")  # one query head (32) from each of 3 groups
    attention = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.05, 0.7])  # (kv group, query head) = 3 × 2
    scores = {i: LayerScores(attention * (i + 1), torch.full((12,), 50.0)) for i in range(3)}
    masks = ModelMasks.full(SHAPE, 3)
    shrink_masks(masks, scores, SHAPE, target, 1.0)
    per_group = masks.layers[0].heads.view(3, 2).sum(dim=1)
    assert per_group.tolist() == [1, 1, 1]
    assert masks.layers[0].heads.tolist() == [False, True, False, True, False, True]


def test_round_to_keeps_every_ffn_width_a_multiple_and_the_floor():
    target = global_target(budget=20 * 24, round_to=4)
    masks = ModelMasks.full(SHAPE, 3)
    shrink_masks(masks, scores_where_layer_zero_matters_least(), SHAPE, target, 1.0)
    widths = [c["ffn"] for c in masks.kept_counts()]
    assert all(w % 4 == 0 and w >= 4 for w in widths)
    assert widths[0] == 4


def test_missing_layer_scores_hold_the_update():
    target = global_target(budget=200)
    masks = ModelMasks.full(SHAPE, 3)
    scores = scores_where_layer_zero_matters_least()
    del scores[2]
    shrink_masks(masks, scores, SHAPE, target, 1.0)
    assert all(m.heads.all() and m.ffn.all() for m in masks.layers)


def test_global_target_is_a_budget_for_the_whole_model():
    target = solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.3, allocation="global", skip_first=2)
    assert isinstance(target, GlobalTarget) and target.pruned_layers == tuple(range(2, 30))
    assert target.removed_parameters == round(0.3 * SMOLLM2_PARAMETERS)
    with pytest.raises(LoraPruneError, match="--attention-fraction"):
        solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.3, allocation="global", attention_fraction=0.2)
    with pytest.raises(LoraPruneError, match=r"at most 0\.72"):
        solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.8, allocation="global")


def test_a_global_run_reaches_the_budget_with_per_layer_widths(tiny_llama, tmp_path):
    blocks = torch.randint(0, tiny_llama.config.vocab_size, (16, 16), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(sparsity=0.3, steps=8, prune_every=1, seq_len=16, allocation="global", save_every=100)
    outcome = train_while_pruning(tiny_llama, blocks, config, tmp_path, progress=False)
    target = outcome.target
    channel = target.sizes.ffn_channel
    assert isinstance(target, GlobalTarget)
    assert 0 <= target.removed_parameters - outcome.achieved_sparsity * target.total_parameters < channel
    assert len({c["ffn"] for c in outcome.masks.kept_counts()}) > 1
