"""The cubic ramp, the whole-model target solver and the monotone mask updates."""

from __future__ import annotations

import pytest
import torch

from loraprune.errors import LoraPruneError
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask
from loraprune.pruning.schedule import PruningSchedule
from loraprune.pruning.scores import LayerScores
from loraprune.pruning.selection import update_layer_mask
from loraprune.pruning.target import solve_target

SMOLLM2 = LayerShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
SMOLLM2_PARAMETERS = 134_515_008


def test_cubic_ramp_reaches_the_full_target_exactly_at_the_end_of_the_ramp():
    schedule = PruningSchedule.build(total_steps=100, warmup_fraction=0.1, cooldown_fraction=0.1, prune_every=7)
    assert schedule.fraction(10) == 0.0 and schedule.fraction(90) == 1.0 and schedule.fraction(100) == 1.0
    fractions = [schedule.fraction(s) for s in range(101)]
    assert fractions == sorted(fractions)
    assert schedule.fraction(50) == pytest.approx(1 - 0.5 ** 3)
    updates = schedule.update_steps()
    assert updates[-1] == 90 and 17 in updates and all(11 <= s <= 90 for s in updates)


def test_scored_steps_count_every_kth_step_until_the_ramp_ends():
    schedule = PruningSchedule.build(total_steps=100, warmup_fraction=0.1, cooldown_fraction=0.1, prune_every=7)
    scored = [s for s in range(100) if schedule.scores_after(s, every=3)]
    assert scored == list(range(0, 90, 3))
    assert schedule.scored_steps(every=3) == len(scored) == 30
    assert schedule.scored_steps(before=10, every=3) == 4  # steps 0, 3, 6, 9
    assert schedule.scored_steps() == 90 and not schedule.scores_after(90)


def test_too_few_steps_for_the_schedule_is_an_error_naming_the_fix():
    with pytest.raises(LoraPruneError, match="--steps"):
        PruningSchedule.build(total_steps=2, warmup_fraction=0.4, cooldown_fraction=0.4, prune_every=1)


@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.35, 0.5, 0.7])
def test_whole_model_sparsity_is_met_within_one_unit(sparsity):
    target = solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, sparsity)
    one_channel_in_every_layer = 30 * 3 * 576
    assert abs(target.removed_parameters - sparsity * SMOLLM2_PARAMETERS) <= one_channel_in_every_layer


def test_round_to_keeps_ffn_width_a_multiple():
    target = solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.5, round_to=64)
    assert (1536 - target.ffn_channels_removed) % 64 == 0
    assert abs(target.achieved_sparsity - 0.5) < 0.01


def test_unreachable_sparsity_fails_with_the_maximum_reachable():
    with pytest.raises(LoraPruneError, match=r"at most 0\.72"):
        solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.8)
    with pytest.raises(LoraPruneError, match="--skip-first"):
        solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.5, skip_first=20, skip_last=5)


def test_unreachable_sparsity_suggests_more_layers_only_when_layers_are_skipped():
    with pytest.raises(LoraPruneError, match="lower --sparsity$"):
        solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.8)
    with pytest.raises(LoraPruneError, match="prune more layers"):
        solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.5, skip_first=20, skip_last=5)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_round_to_beyond_the_ffn_width_is_named(allocation):
    with pytest.raises(LoraPruneError, match="--round-to 100000 is larger than the FFN width \\(1536\\)"):
        solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.1, round_to=100000, allocation=allocation)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_sparsity_that_removes_nothing_warns(allocation, caplog):
    solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 1e-9, allocation=allocation)
    assert "--sparsity 1e-09 removes no parameter" in caplog.text
    caplog.clear()
    solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.1, allocation=allocation)
    assert "removes no parameter" not in caplog.text


def test_layer_exclusions_hold_in_the_target():
    target = solve_target(SMOLLM2, 30, SMOLLM2_PARAMETERS, 0.3, skip_first=3, skip_last=1)
    assert target.pruned_layers == tuple(range(3, 29))


def test_mask_updates_are_monotone_and_follow_scores():
    shape = LayerShape(hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=6)
    mask = LayerMask(torch.ones(4, dtype=torch.bool), torch.ones(6, dtype=torch.bool))
    update_layer_mask(mask, LayerScores(torch.tensor([1.0, 2.0]), torch.tensor([6.0, 5, 4, 3, 2, 1])),
                      shape, "kv_group", attention_removed=0, ffn_removed=2)
    assert mask.ffn.tolist() == [True, True, True, True, False, False]
    # Scores now favour the removed channels: they must stay removed.
    update_layer_mask(mask, LayerScores(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2, 3, 4, 9, 9])),
                      shape, "kv_group", attention_removed=1, ffn_removed=3)
    assert mask.ffn.tolist() == [False, True, True, True, False, False]
    assert mask.heads.tolist() == [True, True, False, False]


def test_query_head_granularity_removes_the_same_number_per_kv_group():
    shape = LayerShape(hidden_size=8, num_heads=6, num_kv_heads=2, head_dim=2, intermediate_size=4)
    mask = LayerMask(torch.ones(6, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    update_layer_mask(mask, LayerScores(torch.tensor([5.0, 1, 3, 9, 8, 0.5]), torch.ones(4)),
                      shape, "query_head", attention_removed=1, ffn_removed=0)
    assert mask.heads.tolist() == [True, False, True, True, True, False]
