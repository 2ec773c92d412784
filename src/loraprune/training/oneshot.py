"""One-shot pruning from a calibration batch, as LLM-Pruner does it, for baselines and analysis.

Scores come from one pass over the calibration blocks; the masks then jump straight to the target.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from loraprune.config import PruneConfig
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks
from loraprune.pruning.scorers import ScoringPlan, build_scorer
from loraprune.pruning.scores import LayerScores
from loraprune.pruning.selection import shrink_masks
from loraprune.pruning.target import GlobalTarget, PruneTarget
from loraprune.training.lora import wrap_with_lora
from loraprune.training.losses import NextTokenCrossEntropy


def calibration_scores(model: PreTrainedModel, blocks: torch.Tensor, config: PruneConfig,
                       target: PruneTarget | GlobalTarget, masks: ModelMasks | None = None) -> dict[int, LayerScores]:
    """Group scores of every pruned layer from one pass over ``blocks`` (the model is left as it was).

    ``masks`` (full ones) ride along during the pass: with bias compensation they record the units' means.
    """
    spec, shape = spec_for(model.config), LayerShape.from_config(model.config)
    # Fresh adapters (B = 0) leave the model's outputs unchanged, so every criterion scores the
    # model itself; the lora criterion then sees G = ∇B·A, as at the first step of a run.
    with torch.random.fork_rng():  # adapters and dropout from config.seed; the caller's RNG untouched
        torch.manual_seed(config.seed)
        work = wrap_with_lora(copy.deepcopy(model), config, spec)
        work.train()
        if masks is not None:
            masks.attach(work, spec)
        scorer = build_scorer(config, ScoringPlan(spec, shape, target.attention_unit, target.pruned_layers))
        scorer.attach(work)
        loss, device = NextTokenCrossEntropy(), next(work.parameters()).device
        if scorer.needs_backward:
            # Before anything is pruned the model is its own distillation teacher (a zero loss with
            # zero gradient), so calibration always scores the language-modelling loss.
            for block in blocks.split(config.batch_size):
                (loss(work, block.to(device)) * len(block) / len(blocks)).backward()
        elif scorer.needs_forward or masks is not None:
            with torch.no_grad():
                for block in blocks.split(config.batch_size):
                    work(input_ids=block.to(device), use_cache=False)
        scores = scorer.step_scores()
    scorer.detach()
    if masks is not None:
        masks.detach()
    return scores


def masks_from_scores(scores: dict[int, LayerScores], shape: LayerShape, num_layers: int,
                      target: PruneTarget | GlobalTarget, device: torch.device | str = "cpu") -> ModelMasks:
    """Masks that remove exactly the target, the lowest-scored units first."""
    masks = ModelMasks.full(shape, num_layers, device)
    shrink_masks(masks, scores, shape, target, 1.0)
    return masks


def one_shot_masks(model: PreTrainedModel, blocks: torch.Tensor, config: PruneConfig,
                   target: PruneTarget | GlobalTarget) -> ModelMasks:
    """Score once on ``blocks`` with ``config.criterion`` and prune straight to ``target``.

    With ``config.bias_compensation`` the masks carry each unit's mean over the calibration tokens.
    """
    shape = LayerShape.from_config(model.config)
    masks = ModelMasks.full(shape, model.config.num_hidden_layers, model.device)
    if config.bias_compensation:
        masks.compensate(shape.head_dim)
    scores = calibration_scores(model, blocks, config, target, masks if config.bias_compensation else None)
    shrink_masks(masks, scores, shape, target, 1.0)
    return masks
