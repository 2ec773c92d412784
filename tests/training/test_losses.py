"""Training losses: cross-entropy, and self-distillation from the unpruned base model."""

from __future__ import annotations

import copy

import pytest
import torch

from loraprune.config import PruneConfig
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.scores import LayerScores
from loraprune.pruning.selection import update_layer_mask
from loraprune.training.losses import NextTokenCrossEntropy, SelfDistillation, build_loss, distillation_kl
from loraprune.training.recipe import PruningRecipe


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_distillation_is_zero_when_student_equals_teacher(tiny_llama):
    ids = _ids()
    with torch.no_grad():
        teacher = tiny_llama(input_ids=ids).logits
    assert distillation_kl(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert SelfDistillation(1.0, 1.0)(tiny_llama, ids, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_kl_matches_its_definition():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    tau = 2.0
    p = torch.softmax(teacher / tau, -1)
    expected = (p * (torch.log_softmax(teacher / tau, -1) - torch.log_softmax(student / tau, -1))).sum(-1).mean()
    assert distillation_kl(student, teacher, tau).item() == pytest.approx(tau ** 2 * expected.item(), rel=1e-5)


def test_mixed_weight_interpolates_cross_entropy_and_distillation(tiny_llama):
    ids = _ids()
    teacher = torch.randn(2, 16, 256)
    cross_entropy = NextTokenCrossEntropy()(tiny_llama, ids).item()
    kl = SelfDistillation(1.0, 1.0)(tiny_llama, ids, teacher).item()
    assert SelfDistillation(0.25, 1.0)(tiny_llama, ids, teacher).item() == pytest.approx(
        0.75 * cross_entropy + 0.25 * kl, rel=1e-5)


def test_build_loss_distils_only_when_asked():
    assert isinstance(build_loss(PruneConfig()), NextTokenCrossEntropy)
    assert isinstance(build_loss(PruneConfig(distill=0.5)), SelfDistillation)


def test_teacher_is_the_unpruned_base_model_even_with_trained_adapters_and_masks(tiny_llama, tmp_path):
    dense = copy.deepcopy(tiny_llama)
    blocks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    recipe = PruningRecipe(tiny_llama, blocks, PruneConfig(distill=1.0, steps=10, sparsity=0.3), tmp_path,
                           progress=False)
    for name, parameter in recipe.inner.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)
    shape = LayerShape.from_config(dense.config)
    update_layer_mask(recipe.masks.layers[0], LayerScores(torch.arange(2.0), torch.arange(128.0)), shape,
                      "kv_group", attention_removed=1, ffn_removed=64)
    ids = _ids()
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        student = recipe.inner(input_ids=ids).logits
    torch.testing.assert_close(recipe._teacher_logits(ids), expected, rtol=1e-5, atol=1e-5)
    assert (student - expected).abs().max() > 1e-2  # the student really differs: adapters and masks are on
    assert not recipe.masks._suspended[0]


@pytest.mark.parametrize(("weight", "temperature"), [(0.5, 1.0), (1.0, 2.0), (0.25, 0.5)])
def test_fused_distillation_gradient_equals_autograd_of_the_plain_formula(weight, temperature):
    import torch.nn.functional as F

    from loraprune.training.losses import _FusedDistillation, next_token_targets

    generator = torch.Generator().manual_seed(3)
    batch = torch.randint(0, 50, (2, 40), generator=generator)  # 80 positions: several chunks
    student = torch.randn(80, 50, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(80, 50, generator=generator, dtype=torch.float64)
    targets = next_token_targets(batch)
    kept = targets != -100
    reference = (1 - weight) * F.cross_entropy(student[kept], targets[kept]) + weight * temperature ** 2 * F.kl_div(
        torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1),
        log_target=True, reduction="batchmean")
    expected_grad, = torch.autograd.grad(reference, student)
    fused = _FusedDistillation.apply(student, teacher, targets, weight, temperature)
    fused_grad, = torch.autograd.grad(fused, student)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(fused_grad, expected_grad, rtol=1e-6, atol=1e-10)  # entries are ~1e-3


@pytest.mark.parametrize(("weight", "temperature", "top_k"), [(1.0, 1.0, 5), (0.5, 2.0, 7)])
def test_top_k_distillation_is_the_kl_over_the_teachers_top_k_renormalised(weight, temperature, top_k):
    import torch.nn.functional as F

    from loraprune.training.losses import _FusedDistillation, next_token_targets

    generator = torch.Generator().manual_seed(4)
    batch = torch.randint(0, 50, (2, 40), generator=generator)
    student = torch.randn(80, 50, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(80, 50, generator=generator, dtype=torch.float64)
    targets = next_token_targets(batch)
    kept = targets != -100
    index = teacher.topk(top_k, dim=-1).indices
    reference = (1 - weight) * F.cross_entropy(student[kept], targets[kept]) + weight * temperature ** 2 * F.kl_div(
        torch.log_softmax(student.gather(1, index) / temperature, -1),
        torch.log_softmax(teacher.gather(1, index) / temperature, -1), log_target=True, reduction="batchmean")
    expected_grad, = torch.autograd.grad(reference, student)
    fused = _FusedDistillation.apply(student, teacher, targets, weight, temperature, top_k)
    fused_grad, = torch.autograd.grad(fused, student)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(fused_grad, expected_grad, rtol=1e-6, atol=1e-10)
    assert fused.item() != pytest.approx(_FusedDistillation.apply(student, teacher, targets, weight, temperature,
                                                                  None).item(), rel=1e-3)


def test_build_loss_passes_the_top_k_on():
    assert build_loss(PruneConfig(distill=1.0, distill_top_k=20)).top_k == 20


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_only_run_scores_the_teacher_sampled_cross_entropy_from_step_zero(tiny_llama, tmp_path, temperature):
    """At step 0 the student is its own teacher: the KL and its gradient are zero, yet fisher scores exist."""
    import torch.nn.functional as F

    from loraprune.config import LoraSettings
    from loraprune.training.checkpoint import capture_rng
    from loraprune.training.losses import sample_teacher_tokens
    from loraprune.training.recipe import StepStart

    block = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    config = PruneConfig(criterion="fisher", distill=1.0, distill_temperature=temperature, steps=10, sparsity=0.3,
                         warmup_fraction=0.0, lora=LoraSettings(dropout=0.0))
    recipe = PruningRecipe(tiny_llama, block.repeat(4, 1), config, tmp_path, progress=False)
    torch.manual_seed(5)
    kl = recipe.forward_backward(StepStart(0, capture_rng()))
    scores = recipe.score()
    assert kl == pytest.approx(0.0, abs=1e-6)
    for name, parameter in recipe.inner.named_parameters():  # training saw the exact KL only: zero gradient
        if parameter.grad is not None:
            assert parameter.grad.abs().max() < 1e-6, name
    assert all(s.attention.sum() > 0 and s.ffn.sum() > 0 for s in scores.values())

    torch.manual_seed(5)
    teacher = recipe._teacher_logits(block)
    logits = recipe.inner(input_ids=block, use_cache=False).logits.reshape(-1, 256)
    sampled = sample_teacher_tokens(teacher, temperature)
    (temperature * F.cross_entropy(logits / temperature, sampled)).backward()
    expected = recipe.scorer.step_scores()
    for index, layer in scores.items():
        torch.testing.assert_close(layer.attention, expected[index].attention, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(layer.ffn, expected[index].ffn, rtol=1e-4, atol=1e-12)
