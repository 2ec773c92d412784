"""Masks, scores and their moving average live on the model's device; scores are float32.

No GPU is needed to prove the first: a model on the ``meta`` device refuses any tensor from the CPU
exactly as a CUDA model does ("Tensor on device cpu is not on the expected device meta").
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraprune.config import PruneConfig
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks
from loraprune.pruning.scorers import SCORERS, ScoringPlan, build_scorer
from loraprune.pruning.scorers.gradient import gradient_element_scores
from loraprune.pruning.scorers.lora import lora_element_scores
from loraprune.pruning.scores import LayerScores, MovingAverageScores
from loraprune.pruning.selection import update_layer_mask
from tests.conftest import TINY_CONFIGS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _meta_model():
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"](), dtype=torch.float32)


def _meta_ids() -> torch.Tensor:
    return torch.zeros(2, 8, dtype=torch.long, device="meta")


def test_masks_are_made_on_the_models_device():
    masks = ModelMasks.for_model(_meta_model())
    assert {m.heads.device.type for m in masks.layers} == {"meta"}
    assert {m.ffn.device.type for m in masks.layers} == {"meta"}


def test_mask_updates_and_masked_forward_stay_on_the_models_device():
    model = _meta_model()
    shape, spec = LayerShape.from_config(model.config), spec_for(model.config)
    masks = ModelMasks.for_model(model)
    scores = LayerScores(torch.zeros(shape.num_kv_heads, device="meta"),
                         torch.zeros(shape.intermediate_size, device="meta"))
    update_layer_mask(masks.layers[1], scores, shape, "kv_group", attention_removed=1, ffn_removed=5)
    assert masks.layers[1].heads.device.type == "meta"
    masks.attach(model, spec)
    assert model(input_ids=_meta_ids()).logits.device.type == "meta"


@pytest.mark.parametrize("criterion", sorted(SCORERS))
def test_every_scorer_returns_float32_scores_on_the_models_device(criterion):
    model = get_peft_model(_meta_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    plan = ScoringPlan(spec_for(model.config), LayerShape.from_config(model.config), "kv_group", (0, 2))
    scorer = build_scorer(PruneConfig(criterion=criterion), plan)
    if scorer.needs_weight_gradients:
        for name, parameter in model.named_parameters():
            if "base_layer.weight" in name:
                parameter.requires_grad_(True)
    scorer.attach(model)
    ids = _meta_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    scores = scorer.step_scores()
    assert sorted(scores) == [0, 2]
    for layer in scores.values():
        assert (layer.attention.device.type, layer.attention.dtype) == ("meta", torch.float32)
        assert (layer.ffn.device.type, layer.ffn.dtype) == ("meta", torch.float32)


def test_resumed_moving_average_is_put_on_the_models_device():
    average = MovingAverageScores(0.9)
    average.update({3: LayerScores(torch.ones(2), torch.ones(4))})
    resumed = MovingAverageScores(0.9)
    resumed.load_state_dict(average.state_dict(), device="meta")
    assert resumed.layers[3].attention.device.type == "meta"
    assert resumed.layers[3].ffn.device.type == "meta"


def _half_linear(gradient_rows: list[float]) -> torch.nn.Linear:
    """A float16 Linear with weights 0.02 and one small gradient value per output row."""
    linear = torch.nn.Linear(4, len(gradient_rows), bias=False, dtype=torch.float16)
    linear.weight.data.fill_(0.02)
    linear.weight.grad = torch.tensor(gradient_rows, dtype=torch.float16)[:, None].expand(-1, 4).clone()
    return linear


def test_grad_scores_of_float16_weights_do_not_underflow_to_ties():
    # (3e-5 · 0.02)² = 3.6e-13 is 0 in float16: squaring before the float32 cast ties every unit.
    scores = gradient_element_scores(_half_linear([3e-5, 6e-5]))
    assert scores.dtype == torch.float32
    first, second = scores.sum(dim=1).tolist()
    assert first > 0 and second == pytest.approx(4 * first, rel=1e-2)


def test_lora_scores_of_bfloat16_adapters_are_float32_and_nonzero():
    base = torch.nn.Linear(8, 4, bias=False, dtype=torch.bfloat16)
    base.weight.data.fill_(0.02)
    adapted = get_peft_model(torch.nn.Sequential(base), LoraConfig(r=2, target_modules=["0"]),
                             autocast_adapter_dtype=False)
    layer = adapted.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == torch.bfloat16
    a.grad, b.grad = torch.full_like(a, 1e-4), torch.full_like(b, 3e-5)
    scores = lora_element_scores(layer)
    assert scores.dtype == torch.float32 and bool((scores > 0).all())


def test_scoring_without_a_backward_pass_is_an_error_not_zero_scores(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=TARGETS))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="backward"):
        lora_element_scores(q_proj)
    with pytest.raises(RuntimeError, match="backward"):
        gradient_element_scores(q_proj)
