"""--calibration: units are scored on one text while LoRA learns from another, and a resumed run reads the same text."""

from __future__ import annotations

import copy
import dataclasses
import subprocess

import pytest
import torch

from loraprune import job
from loraprune.config import LoraSettings, PruneConfig
from loraprune.data.generated import CALIBRATION_FILE, GeneratedText
from loraprune.errors import LoraPruneError
from loraprune.training.checkpoint import capture_rng, load_checkpoint
from loraprune.training.recipe import PruningRecipe, RunInterrupted, StepStart
from tests.conftest import save_tiny_run_inputs, tiny_prune_command


def _blocks(seed: int, count: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (count, 16), generator=torch.Generator().manual_seed(seed))


def _config(**overrides) -> PruneConfig:
    return PruneConfig(criterion="fisher", steps=10, sparsity=0.3, warmup_fraction=0.0, cooldown_fraction=0.1,
                       prune_every=2, lora=LoraSettings(dropout=0.0), save_every=1, **overrides)


def _first_step(model, training: torch.Tensor, folder, calibration: torch.Tensor | None = None):
    """(the step's fisher scores, the adapters' gradients) of a run's first forward/backward."""
    recipe = PruningRecipe(copy.deepcopy(model), training, _config(), folder, progress=False,
                           calibration_blocks=None if calibration is None else [calibration])
    recipe.forward_backward(StepStart(0, capture_rng()))
    gradients = {name: p.grad.clone() for name, p in recipe.inner.named_parameters() if p.grad is not None}
    return recipe.score(), gradients


def test_units_are_scored_on_the_calibration_text_and_adapters_learn_from_the_training_text(tiny_llama, tmp_path):
    training, calibration = _blocks(1), _blocks(2)
    scores, gradients = _first_step(tiny_llama, training, tmp_path / "both", calibration)
    scores_on_calibration, _ = _first_step(tiny_llama, calibration, tmp_path / "calibration")
    scores_on_training, gradients_on_training = _first_step(tiny_llama, training, tmp_path / "training")

    assert gradients.keys() == gradients_on_training.keys() and gradients
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, gradients_on_training[name], msg=name)
    for index, layer in scores.items():
        torch.testing.assert_close(layer.ffn, scores_on_calibration[index].ffn, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(layer.attention, scores_on_calibration[index].attention, rtol=1e-4, atol=1e-12)
    assert not torch.allclose(scores[0].ffn, scores_on_training[0].ffn)


@pytest.mark.slow
def test_smollm2_scores_pydoc_while_learning_austen(smollm2, austen_dir, tmp_path):
    """On the real model: the first step's scores are pydoc's, the adapters' gradients Austen's."""
    from loraprune.data import load_text, token_blocks

    model, tokenizer = smollm2
    austen = token_blocks(tokenizer, load_text("austen", "train", austen_dir), 64, 256)
    pydoc = token_blocks(tokenizer, load_text("pydoc", "train"), 64, 256)
    scores, gradients = _first_step(model, austen, tmp_path / "both", pydoc)
    scores_on_pydoc, _ = _first_step(model, pydoc, tmp_path / "pydoc")
    scores_on_austen, gradients_on_austen = _first_step(model, austen, tmp_path / "austen")
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, gradients_on_austen[name], msg=name)
    for index, layer in scores.items():
        torch.testing.assert_close(layer.ffn, scores_on_pydoc[index].ffn, rtol=1e-3, atol=1e-12)
    ranks = [torch.argsort(s[0].ffn) for s in (scores, scores_on_austen)]
    assert not torch.equal(*ranks)  # the two texts would cut different channels


def test_scoring_every_other_step_scores_half_the_ramp_on_the_calibration_text(tiny_llama, tmp_path):
    training, calibration = _blocks(1, 16), _blocks(2, 16)
    recipe = PruningRecipe(copy.deepcopy(tiny_llama), training, _config(calibration_every=2), tmp_path,
                           progress=False, calibration_blocks=[calibration])
    scored, real_update = [], recipe.scores.update

    def counting_update(fresh):
        scored.append(recipe.step)
        return real_update(fresh)

    recipe.scores.update = counting_update
    outcome = recipe.run()
    end_step = recipe.schedule.end_step  # 9 of 10 steps: no warm-up, one step of cool-down
    assert scored == list(range(0, end_step, 2))  # steps 0, 2, …, 8 (completed before the scored one)
    assert recipe.calibration.samples_seen == len(scored) == recipe.schedule.scored_steps(every=2) == 5
    assert outcome.achieved_sparsity == pytest.approx(0.3, abs=0.05)


@pytest.mark.parametrize("every", [1, 2])
def test_a_run_interrupted_and_resumed_reads_the_same_calibration_blocks(tiny_llama, tmp_path, monkeypatch, every):
    training, calibration = _blocks(1, 16), _blocks(2, 16)
    for folder in ("reference", "interrupted"):
        (tmp_path / folder).mkdir()
    config = _config(calibration_every=every)
    reference = PruningRecipe(copy.deepcopy(tiny_llama), training, config, tmp_path / "reference",
                              progress=False, calibration_blocks=[calibration]).run()

    original = PruningRecipe.forward_backward

    def stop_at_step_five(self, start):
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self, start)

    run_dir = tmp_path / "interrupted"
    monkeypatch.setattr(PruningRecipe, "forward_backward", stop_at_step_five)
    with pytest.raises(RunInterrupted):
        PruningRecipe(copy.deepcopy(tiny_llama), training, config, run_dir, progress=False,
                      calibration_blocks=[calibration]).run()
    monkeypatch.setattr(PruningRecipe, "forward_backward", original)
    resumed = PruningRecipe(copy.deepcopy(tiny_llama), training, config, run_dir, load_checkpoint(run_dir),
                            progress=False, calibration_blocks=[calibration]).run()

    assert resumed.steps == reference.steps == 10
    for name, kept in reference.masks.state_dict().items():
        torch.testing.assert_close(resumed.masks.state_dict()[name], kept, msg=name)


def test_calibration_needs_a_criterion_that_scores_a_separate_pass():
    with pytest.raises(LoraPruneError, match="--calibration needs a criterion"):
        PruneConfig(criterion="lora", calibration="pydoc").validate()
    with pytest.raises(LoraPruneError, match="name corpora or self joined by"):
        PruneConfig(calibration="austen+").validate()
    with pytest.raises(LoraPruneError, match="name corpora or self joined by"):
        PruneConfig(calibration="self+austen+self").validate()
    PruneConfig(calibration="austen+self").validate()
    PruneConfig(calibration="self").validate()
    with pytest.raises(LoraPruneError, match="--calibration-every needs --calibration"):
        PruneConfig(calibration_every=2).validate()
    with pytest.raises(LoraPruneError, match="--calibration-every must be a positive integer"):
        PruneConfig(calibration="self", calibration_every=0).validate()


def _self_scored_config(model_dir, text) -> PruneConfig:
    return PruneConfig(model=str(model_dir), data=f"text:{text}", calibration=f"text:{text}+self", sparsity=0.3,
                       steps=8, prune_every=2, seq_len=32, eval_seq_len=32, eval_tokens=320, save_every=1, lr=1e-3,
                       cooldown_fraction=0.1)  # a long ramp: the interruption below falls inside it


def test_self_calibration_scores_bos_samples_cached_in_the_run_and_reused_on_resume(tmp_path, monkeypatch):
    model_dir, text = save_tiny_run_inputs(tmp_path)
    config = _self_scored_config(model_dir, text)
    scored_on, real_training = [], job.train_while_pruning

    def spy(*args, calibration_blocks=None, **kwargs):
        scored_on.append(calibration_blocks)
        return real_training(*args, calibration_blocks=calibration_blocks, **kwargs)

    monkeypatch.setattr(job, "train_while_pruning", spy)
    reference = job.prune(config, tmp_path / "reference", progress=False)
    samples = GeneratedText.load(reference.output_dir / "run", CALIBRATION_FILE)
    end_step = 7  # 8 steps, the last 10 % (one step) a cool-down: one sample scored per step before it
    assert samples.train.shape == (end_step, 32) and (samples.train[:, 0] == 1).all()  # every one from BOS <s>
    text_blocks, self_blocks = scored_on[0]
    assert torch.equal(self_blocks, samples.train) and not torch.equal(text_blocks[:end_step], samples.train)

    real_forward_backward = PruningRecipe.forward_backward

    def stop_at_step_five(self, start):
        if self.step == 5:
            raise KeyboardInterrupt
        return real_forward_backward(self, start)

    monkeypatch.setattr(PruningRecipe, "forward_backward", stop_at_step_five)
    with pytest.raises(RunInterrupted):
        job.prune(config, tmp_path / "out", progress=False)
    monkeypatch.setattr(PruningRecipe, "forward_backward", real_forward_backward)

    def no_sampling_on_resume(*args, **kwargs):
        raise AssertionError("a resumed run must reuse its cached scoring samples")

    monkeypatch.setattr(job, "scoring_text", no_sampling_on_resume)
    resumed = job.prune(config, tmp_path / "out", resume=True, progress=False)
    assert torch.equal(GeneratedText.load(tmp_path / "out" / "run", CALIBRATION_FILE).train, samples.train)
    assert resumed.report["kept_per_layer"] == reference.report["kept_per_layer"]


def test_self_calibration_every_other_step_samples_half_the_blocks(tmp_path):
    model_dir, text = save_tiny_run_inputs(tmp_path)
    config = dataclasses.replace(_self_scored_config(model_dir, text), calibration_every=2)
    result = job.prune(config, tmp_path / "out", progress=False)
    samples = GeneratedText.load(result.output_dir / "run", CALIBRATION_FILE)
    assert samples.train.shape == (4, 32)  # the ramp's 7 steps, every other one scored: steps 0, 2, 4, 6


def test_cli_refuses_an_unknown_calibration_corpus_before_writing_anything(tiny_run_inputs, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(tiny_prune_command(*tiny_run_inputs, out, "--calibration", "no-such-text"),
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "unknown data 'no-such-text'" in result.stderr
    assert not out.exists() and not out.with_name("out.partial").exists()
