"""The importance criteria: LoRAPrune's estimated gradient and the baselines."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraprune.config import PruneConfig
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape, attention_scores, ffn_scores
from loraprune.pruning.scorers import ScoringPlan, build_scorer
from loraprune.pruning.scorers.gradient import gradient_element_scores
from loraprune.pruning.scorers.lora import estimated_weight_gradient, lora_element_scores
from loraprune.pruning.scorers.magnitude import magnitude_element_scores
from loraprune.pruning.scorers.weights import effective_weight
from loraprune.pruning.scores import LayerScores, MovingAverageScores
from loraprune.training.lora import enable_weight_gradients

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(model, seed: int = 0):
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    torch.manual_seed(seed)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B so every term of G matters
            parameter.data.normal_(0, 0.05)
    return peft_model


def _backward(peft_model):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    peft_model(input_ids=ids, labels=ids).loss.backward()


def test_lora_estimated_gradient_matches_the_formula_by_hand(tiny_llama):
    peft_model = _adapted(tiny_llama)
    _backward(peft_model)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight
    by_hand = b.grad @ a + b @ a.grad - b.grad @ a.grad
    assert torch.allclose(estimated_weight_gradient(a.detach(), b.detach(), a.grad, b.grad), by_hand)
    w_eff = q_proj.base_layer.weight + q_proj.scaling["default"] * b @ a
    expected = (by_hand * w_eff).square()
    assert torch.allclose(lora_element_scores(q_proj, "square"), expected.detach(), atol=1e-9)
    assert torch.allclose(lora_element_scores(q_proj, "abs"), expected.detach().sqrt(), atol=1e-6)


def test_lora_criterion_never_creates_frozen_weight_gradients(tiny_llama):
    peft_model = _adapted(tiny_llama)
    _backward(peft_model)
    for layer in peft_model.base_model.model.model.layers:
        for module in (layer.self_attn.q_proj, layer.mlp.down_proj):
            lora_element_scores(module)
            assert module.base_layer.weight.requires_grad is False
            assert module.base_layer.weight.grad is None


def test_gradient_criterion_uses_true_weight_gradients(tiny_llama):
    peft_model = _adapted(tiny_llama)
    up = peft_model.base_model.model.model.layers[1].mlp.up_proj
    up.base_layer.weight.requires_grad_(True)
    _backward(peft_model)
    assert up.base_layer.weight.grad is not None
    expected = (up.base_layer.weight.grad * effective_weight(up)).square()
    assert torch.allclose(gradient_element_scores(up), expected)


def test_magnitude_scores_are_squared_effective_weights(tiny_llama):
    peft_model = _adapted(tiny_llama)
    down = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert torch.allclose(magnitude_element_scores(down), effective_weight(down).square())


def test_gqa_unit_scores_sum_query_heads_with_their_shared_kv_head():
    shape = LayerShape(hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=6)
    q = torch.zeros(8, 8)
    q[0:2] = 1.0  # query head 0 (KV group 0)
    q[6:8] = 3.0  # query head 3 (KV group 1)
    k, v, o = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(8, 8)
    k[2:4] = 5.0  # KV head 1
    scores = attention_scores(q, k, v, o, shape, "kv_group", normalise=False)
    assert scores.tolist() == [16.0, 48.0 + 80.0]
    per_query = attention_scores(q, k, v, o, shape, "query_head", normalise=False)
    assert per_query.tolist() == [16.0, 0.0, 0.0, 48.0]


def test_ffn_channel_scores_couple_gate_up_rows_and_down_column():
    gate, up, down = torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4, 3)
    gate[1] = 1.0
    down[:, 2] = 2.0
    assert ffn_scores(gate, up, down, normalise=False).tolist() == [0.0, 4.0, 8.0]


def test_moving_average_skips_non_finite_updates():
    average = MovingAverageScores(decay=0.9)
    average.update({0: LayerScores(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))})
    average.update({0: LayerScores(torch.tensor([3.0, 4.0]), torch.tensor([0.0]))})
    assert torch.allclose(average.layers[0].attention, torch.tensor([1.2, 2.2]))
    assert average.update({0: LayerScores(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0]))}) is False
    assert average.skipped_updates == 1
    assert torch.allclose(average.layers[0].attention, torch.tensor([1.2, 2.2]))


def _layer_scores(peft_model, criterion: str, layer: int = 1, **settings):
    """One layer's group scores from the registered scorer of ``criterion``."""
    config = PruneConfig(criterion=criterion, **settings)
    plan = ScoringPlan(spec_for(peft_model.config), LayerShape.from_config(peft_model.config), "kv_group", (layer,))
    scorer = build_scorer(config, plan)
    scorer.attach(peft_model)
    return scorer.step_scores()[layer]


def test_lora_criterion_scores_columns_as_the_paper_unless_rows_only(tiny_llama):
    peft_model = _adapted(tiny_llama)
    _backward(peft_model)
    layer = peft_model.base_model.model.model.layers[1]
    rows_only = _layer_scores(peft_model, "lora", lora_columns=False)
    with_columns = _layer_scores(peft_model, "lora")
    layer.mlp.down_proj.lora_B["default"].weight.grad.mul_(-7.0)
    layer.self_attn.o_proj.lora_A["default"].weight.grad.normal_()
    assert torch.equal(_layer_scores(peft_model, "lora", lora_columns=False).ffn, rows_only.ffn)
    assert torch.equal(_layer_scores(peft_model, "lora", lora_columns=False).attention, rows_only.attention)
    changed = _layer_scores(peft_model, "lora")
    assert not torch.allclose(changed.ffn, with_columns.ffn)
    assert not torch.allclose(changed.attention, with_columns.attention)


def test_every_criterion_the_config_accepts_has_a_registered_scorer():
    from loraprune.config import CRITERIA
    from loraprune.pruning.scorers import SCORERS

    assert sorted(CRITERIA) == sorted(SCORERS)


@pytest.mark.parametrize("criterion", ["lora", "grad", "magnitude"])
def test_row_block_scores_equal_the_whole_matrix_scores(tiny_llama, monkeypatch, criterion):
    from loraprune.pruning.scorers import elements

    peft_model = _adapted(tiny_llama)
    if criterion == "grad":
        enable_weight_gradients(peft_model, spec_for(peft_model.config))
    _backward(peft_model)
    layer = peft_model.base_model.model.model.layers[1]
    whole = {"lora": lora_element_scores, "grad": gradient_element_scores,
             "magnitude": magnitude_element_scores}[criterion]
    attention, mlp = layer.self_attn, layer.mlp
    shape = LayerShape.from_config(peft_model.config)
    expected_attention = attention_scores(whole(attention.q_proj), whole(attention.k_proj), whole(attention.v_proj),
                                          whole(attention.o_proj), shape, "kv_group")
    expected_ffn = ffn_scores(whole(mlp.gate_proj), whole(mlp.up_proj), whole(mlp.down_proj))
    monkeypatch.setattr(elements, "ROWS_PER_BLOCK", 5)  # blocks that do not divide 64 or 128 rows
    blocked = _layer_scores(peft_model, criterion)
    assert torch.allclose(blocked.attention, expected_attention, rtol=1e-5)
    assert torch.allclose(blocked.ffn, expected_ffn, rtol=1e-5)
