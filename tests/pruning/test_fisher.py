"""The mask-gradient (fisher) scorer is exact: it equals Σ ∇W ⊙ W over a unit's o/down columns."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraprune.config import PruneConfig
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.scorers import ScoringPlan, build_scorer
from loraprune.pruning.scorers.fisher import per_sequence_mask_gradients
from loraprune.pruning.target import PruneTarget
from loraprune.training.oneshot import calibration_scores
from tests.conftest import build_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = (0, 2)


def _adapted_double_llama():
    """A float64 tiny LLaMA with LoRA (no dropout) whose B is non-zero, so W + s·B·A ≠ W."""
    model = build_tiny_model("llama").double()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    return peft_model


def _sequences() -> torch.Tensor:
    return torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _fisher_scores(model, unit: str, batches: list[torch.Tensor], scale: float = 1.0, window: int | None = None):
    plan = ScoringPlan(spec_for(model.config), LayerShape.from_config(model.config), unit, LAYERS)
    scorer = build_scorer(PruneConfig(criterion="fisher", fisher_window=window), plan)
    scorer.attach(model)
    for batch in batches:
        (_loss(model, batch) * scale).backward()
    scores = scorer.step_scores()
    scorer.detach()
    return scores


def _column_taylor_per_sequence(model, ids: torch.Tensor, unit: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Σ ∇W ⊙ (W + s·B·A) over each unit's o_proj / down_proj columns, with real ∇W, per sequence."""
    shape = LayerShape.from_config(model.config)
    layers = model.base_model.model.model.layers
    projections = [(i, layers[i].self_attn.o_proj, layers[i].mlp.down_proj) for i in LAYERS]
    for _, o_proj, down_proj in projections:
        o_proj.base_layer.weight.requires_grad_(True)
        down_proj.base_layer.weight.requires_grad_(True)
    per_sequence = {i: ([], []) for i in LAYERS}
    for sequence in ids:
        model.zero_grad(set_to_none=True)
        _loss(model, sequence[None]).backward()
        for i, o_proj, down_proj in projections:
            o_effective = o_proj.get_delta_weight("default") + o_proj.base_layer.weight
            down_effective = down_proj.get_delta_weight("default") + down_proj.base_layer.weight
            heads = (o_proj.base_layer.weight.grad * o_effective).sum(dim=0).view(-1, shape.head_dim).sum(dim=1)
            if unit == "kv_group":
                heads = heads.view(shape.num_kv_heads, shape.queries_per_kv).sum(dim=1)
            channels = (down_proj.base_layer.weight.grad * down_effective).sum(dim=0)
            per_sequence[i][0].append(heads.detach())
            per_sequence[i][1].append(channels.detach())
    model.zero_grad(set_to_none=True)
    for _, o_proj, down_proj in projections:
        o_proj.base_layer.weight.requires_grad_(False)
        down_proj.base_layer.weight.requires_grad_(False)
    return {i: (torch.stack(a), torch.stack(f)) for i, (a, f) in per_sequence.items()}


@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_mask_gradient_equals_weight_gradient_times_weight_over_the_units_columns(unit):
    model = _adapted_double_llama()
    ids = _sequences()
    exact = _column_taylor_per_sequence(model, ids, unit)
    fisher = _fisher_scores(model, unit, [ids])
    batch = len(ids)  # the batched loss is a mean over sequences: each one's gradient is 1/batch as large
    for i in LAYERS:
        attention, ffn = exact[i]
        torch.testing.assert_close(fisher[i].attention, (attention / batch).square().sum(dim=0).float(),
                                   rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(fisher[i].ffn, (ffn / batch).square().sum(dim=0).float(), rtol=1e-6, atol=1e-12)
        assert fisher[i].attention.dtype == torch.float32


def test_micro_batches_accumulate_to_the_full_batch_scores():
    model = _adapted_double_llama()
    ids = _sequences()
    whole = _fisher_scores(model, "kv_group", [ids])
    model.zero_grad(set_to_none=True)
    split = _fisher_scores(model, "kv_group", [ids[:1], ids[1:2], ids[2:]], scale=1 / 3)
    for i in LAYERS:
        torch.testing.assert_close(split[i].attention, whole[i].attention, rtol=1e-6, atol=0)
        torch.testing.assert_close(split[i].ffn, whole[i].ffn, rtol=1e-6, atol=0)


def test_a_window_squares_the_mask_gradient_of_each_run_of_tokens_the_last_one_shorter():
    generator = torch.Generator().manual_seed(3)
    activation, gradient = torch.randn(2, 5, 6, generator=generator), torch.randn(2, 5, 6, generator=generator)
    per_token = (activation * gradient).view(2, 5, 3, 2).sum(dim=3)  # 3 units of width 2
    expected = torch.stack([per_token[:, :2].sum(dim=1), per_token[:, 2:4].sum(dim=1), per_token[:, 4:].sum(dim=1)],
                           dim=1).flatten(0, 1)
    torch.testing.assert_close(per_sequence_mask_gradients(activation, gradient, 2, window=2), expected)
    torch.testing.assert_close(per_sequence_mask_gradients(activation, gradient, 2, window=5), per_token.sum(dim=1))


def test_the_fisher_window_setting_reaches_the_scorer():
    model = _adapted_double_llama()
    ids = _sequences()  # 12 tokens each
    whole = _fisher_scores(model, "kv_group", [ids])
    model.zero_grad(set_to_none=True)
    same = _fisher_scores(model, "kv_group", [ids], window=12)
    model.zero_grad(set_to_none=True)
    windows = _fisher_scores(model, "kv_group", [ids], window=3)
    for i in LAYERS:
        torch.testing.assert_close(same[i].ffn, whole[i].ffn)
        assert not torch.allclose(windows[i].ffn, whole[i].ffn)


def test_fisher_scoring_never_creates_frozen_weight_gradients():
    model = _adapted_double_llama()
    _fisher_scores(model, "kv_group", [_sequences()])
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


def test_scores_of_one_step_do_not_leak_into_the_next():
    model = _adapted_double_llama()
    plan = ScoringPlan(spec_for(model.config), LayerShape.from_config(model.config), "kv_group", LAYERS)
    scorer = build_scorer(PruneConfig(criterion="fisher"), plan)
    scorer.attach(model)
    _loss(model, _sequences()).backward()
    first = scorer.step_scores()
    _loss(model, _sequences()).backward()
    second = scorer.step_scores()
    torch.testing.assert_close(second[0].ffn, first[0].ffn)
    with torch.no_grad():  # no backward: nothing to score
        _loss(model, _sequences())
    with pytest.raises(RuntimeError, match="no backward pass"):
        scorer.step_scores()


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_one_shot_mode_accepts_the_fisher_scorer_and_calibrates_on_cross_entropy(tiny_llama, distill):
    target = PruneTarget(pruned_layers=(1, 3), attention_unit="kv_group", attention_units_removed=1,
                         ffn_channels_removed=3, total_parameters=1, removed_parameters=0)
    config = PruneConfig(criterion="fisher", distill=distill)
    scores = calibration_scores(tiny_llama, _sequences(), config, target)
    assert sorted(scores) == [1, 3]
    assert scores[1].attention.shape == (2,) and scores[1].ffn.shape == (128,)
    assert bool((scores[1].ffn > 0).any())


def test_with_bias_compensation_fisher_scores_replacing_a_unit_by_its_mean():
    """Removal under compensation changes the unit's output from a to its mean: Σ ∂L/∂a · (a − mean)."""
    from loraprune.pruning.masks import ModelMasks

    model = _adapted_double_llama()
    shape = LayerShape.from_config(model.config)
    masks = ModelMasks.full(shape, model.config.num_hidden_layers).compensate(shape.head_dim)
    generator = torch.Generator().manual_seed(7)
    for means in masks.means:
        for unit_means in (means.attention, means.ffn):
            unit_means.sums.copy_(torch.randn(unit_means.sums.shape, generator=generator))
            unit_means.counts.fill_(1.0)
    down_proj = model.base_model.model.model.layers[LAYERS[0]].mlp.down_proj
    seen = {}

    def keep(module, inputs):
        inputs[0].register_hook(lambda gradient: seen.setdefault("gradient", gradient.detach()))
        seen["activation"] = inputs[0].detach()

    handle = down_proj.register_forward_pre_hook(keep)
    plan = ScoringPlan(spec_for(model.config), shape, "kv_group", LAYERS)
    scorer = build_scorer(PruneConfig(criterion="fisher"), plan)
    scorer.attach(model)
    scorer.compensate_with(masks.means)
    ids = _sequences()[:1]
    _loss(model, ids).backward()
    scores = scorer.step_scores()
    handle.remove()
    mean = masks.means[LAYERS[0]].ffn.mean().double()
    expected = ((seen["activation"] - mean) * seen["gradient"]).sum(dim=(0, 1)).square()
    torch.testing.assert_close(scores[LAYERS[0]].ffn.double(), expected, rtol=1e-4, atol=1e-12)
    uncompensated = (seen["activation"] * seen["gradient"]).sum(dim=(0, 1)).square()
    assert not torch.allclose(expected, uncompensated, rtol=1e-2)
