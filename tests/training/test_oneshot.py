"""One-shot pruning: score once on calibration blocks, then jump straight to the target's counts."""

from __future__ import annotations

import pytest
import torch

from loraprune.config import PruneConfig
from loraprune.models import count_parameters, projection_biases, spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks, removed_parameters
from loraprune.pruning.scores import LayerScores
from loraprune.pruning.target import PruneTarget, solve_model_target
from loraprune.training.oneshot import calibration_scores, masks_from_scores, one_shot_masks
from tests.conftest import build_tiny_model

SHAPE = LayerShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)


def calibration_blocks() -> torch.Tensor:
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))


def hand_target(layers: tuple[int, ...], unit: str, attention_removed: int, ffn_removed: int) -> PruneTarget:
    return PruneTarget(layers, unit, attention_removed, ffn_removed, total_parameters=1, removed_parameters=0)


def same_masks(a: ModelMasks, b: ModelMasks) -> bool:
    return all(torch.equal(x.heads, y.heads) and torch.equal(x.ffn, y.ffn) for x, y in zip(a.layers, b.layers))


class NoBackward(Exception):
    pass


@pytest.fixture
def forbid_backward(monkeypatch):
    """Any backward pass raises NoBackward."""
    def refuse(*args, **kwargs):
        raise NoBackward
    monkeypatch.setattr(torch.autograd, "backward", refuse)


@pytest.mark.parametrize("criterion", ["lora", "grad"])
def test_calibration_scores_leave_the_passed_model_untouched(tiny_llama, criterion):
    tiny_llama.model.embed_tokens.weight.requires_grad_(False)
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj.weight
    q_proj.grad = torch.full_like(q_proj, 0.5)
    values = {name: p.detach().clone() for name, p in tiny_llama.named_parameters()}
    flags = {name: p.requires_grad for name, p in tiny_llama.named_parameters()}
    config = PruneConfig(criterion=criterion, batch_size=2)

    scores = calibration_scores(tiny_llama, calibration_blocks(), config, hand_target((1, 2), "kv_group", 1, 10))

    assert sorted(scores) == [1, 2] and scores[1].attention.shape == (2,) and scores[1].ffn.shape == (128,)
    assert type(tiny_llama).__name__ == "LlamaForCausalLM" and not tiny_llama.training
    assert not [name for name, _ in tiny_llama.named_modules() if "lora_" in name]
    for name, parameter in tiny_llama.named_parameters():
        assert torch.equal(parameter, values[name]), name
        assert parameter.requires_grad == flags[name], name
        assert parameter.grad is None or parameter is q_proj, name
    assert torch.equal(q_proj.grad, torch.full_like(q_proj, 0.5))


@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_one_shot_masks_remove_exactly_the_target_counts_and_leave_skipped_layers_whole(tiny_llama, unit):
    config = PruneConfig(criterion="grad", sparsity=0.3, attention_unit=unit, skip_first_layers=1, batch_size=2)
    target = solve_model_target(tiny_llama, config)
    assert target.pruned_layers == (1, 2, 3) and target.attention_units_removed == 1 and target.ffn_channels_removed > 0

    masks = one_shot_masks(tiny_llama, calibration_blocks(), config, target)

    heads_kept = 4 - 2 * target.attention_units_removed  # 2 query heads per KV group; 2 KV groups
    ffn_kept = 128 - target.ffn_channels_removed
    assert masks.kept_counts() == [{"heads": 4, "ffn": 128}] + [{"heads": heads_kept, "ffn": ffn_kept}] * 3
    if unit == "query_head":  # the same number of query heads goes from every KV group
        for layer in masks.layers[1:]:
            assert layer.heads.view(2, 2).sum(dim=1).tolist() == [heads_kept // 2] * 2
    biases = projection_biases(tiny_llama, spec_for(tiny_llama.config))
    assert removed_parameters(masks, SHAPE, *biases) == target.removed_parameters
    assert target.total_parameters == count_parameters(tiny_llama)


def test_magnitude_prunes_planted_zero_units_without_a_backward_pass(tiny_llama, forbid_backward):
    layer = tiny_llama.model.layers[1]
    with torch.no_grad():  # KV group 1 (query heads 2, 3) and FFN channels 5, 17, 90 weigh nothing
        layer.self_attn.q_proj.weight[32:].zero_()
        layer.self_attn.k_proj.weight[16:].zero_()
        layer.self_attn.v_proj.weight[16:].zero_()
        layer.self_attn.o_proj.weight[:, 32:].zero_()
        for channel in (5, 17, 90):
            layer.mlp.gate_proj.weight[channel].zero_()
            layer.mlp.up_proj.weight[channel].zero_()
            layer.mlp.down_proj.weight[:, channel].zero_()
    config = PruneConfig(criterion="magnitude", batch_size=2)

    masks = one_shot_masks(tiny_llama, calibration_blocks(), config, hand_target((1,), "kv_group", 1, 3))

    assert masks.layers[1].heads.tolist() == [True, True, False, False]
    assert (~masks.layers[1].ffn).nonzero().flatten().tolist() == [5, 17, 90]
    assert masks.kept_counts()[0] == masks.kept_counts()[2] == {"heads": 4, "ffn": 128}


def test_random_criterion_needs_no_backward_and_follows_the_seed(tiny_llama, forbid_backward):
    target = hand_target((0, 3), "kv_group", 1, 40)
    masks = [one_shot_masks(tiny_llama, calibration_blocks(), PruneConfig(criterion="random", seed=seed), target)
             for seed in (0, 0, 1)]
    assert masks[0].kept_counts() == [{"heads": 2, "ffn": 88}, {"heads": 4, "ffn": 128},
                                      {"heads": 4, "ffn": 128}, {"heads": 2, "ffn": 88}]
    assert same_masks(masks[0], masks[1])
    assert not torch.equal(masks[0].layers[0].ffn, masks[2].layers[0].ffn)


def test_gradient_criteria_do_run_a_backward_pass(tiny_llama, forbid_backward):
    """The guard used above notices a backward pass: grad scoring trips it."""
    with pytest.raises(NoBackward):
        one_shot_masks(tiny_llama, calibration_blocks(), PruneConfig(criterion="grad"), hand_target((1,), "kv_group", 1, 3))


def test_masks_from_scores_drop_the_lowest_scored_units():
    ffn_scores = torch.randperm(128, generator=torch.Generator().manual_seed(0)).float()
    scores = {2: LayerScores(torch.tensor([0.5, 0.1]), ffn_scores)}
    masks = masks_from_scores(scores, SHAPE, 4, hand_target((2,), "kv_group", 1, 5))
    assert masks.layers[2].heads.tolist() == [True, True, False, False]
    assert sorted((~masks.layers[2].ffn).nonzero().flatten().tolist()) == sorted(ffn_scores.argsort()[:5].tolist())
    assert [m["ffn"] for m in masks.kept_counts()] == [128, 128, 123, 128]

    by_query_head = {1: LayerScores(torch.tensor([4.0, 1.0, 2.0, 3.0]), torch.arange(128.0))}
    masks = masks_from_scores(by_query_head, SHAPE, 4, hand_target((1,), "query_head", 1, 2))
    assert masks.layers[1].heads.tolist() == [True, False, False, True]  # the lower head of each KV group
    assert masks.layers[1].ffn[:2].tolist() == [False, False] and bool(masks.layers[1].ffn[2:].all())


@pytest.mark.parametrize("criterion", ["grad", "magnitude", "random"])
def test_same_config_gives_identical_masks_twice(criterion):
    model = build_tiny_model("qwen2")
    config = PruneConfig(criterion=criterion, sparsity=0.3, batch_size=2, seed=3)
    target = solve_model_target(model, config)
    first = one_shot_masks(model, calibration_blocks(), config, target)
    torch.rand(5)  # global RNG state moves on between the two calls
    assert same_masks(first, one_shot_masks(model, calibration_blocks(), config, target))


def test_same_config_gives_identical_lora_masks_twice(tiny_llama):
    config = PruneConfig(criterion="lora", sparsity=0.3, batch_size=2, seed=3)
    target = solve_model_target(tiny_llama, config)
    first = one_shot_masks(tiny_llama, calibration_blocks(), config, target)
    torch.rand(5)
    assert same_masks(first, one_shot_masks(tiny_llama, calibration_blocks(), config, target))
