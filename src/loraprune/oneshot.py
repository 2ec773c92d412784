"""One-shot pruning from a calibration batch, as LLM-Pruner does it, for baselines and analysis.

Scores come from one pass over the calibration blocks; the masks then jump straight to the target.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from loraprune.config import PruneConfig
from loraprune.criteria import needs_weight_gradients
from loraprune.groups import LayerShape
from loraprune.importance import LayerScores, model_scores
from loraprune.masks import ModelMasks
from loraprune.models import decoder_layers, spec_for
from loraprune.recipe import compute_loss, wrap_with_lora
from loraprune.selection import update_layer_mask
from loraprune.target import PruneTarget


def calibration_scores(model: PreTrainedModel, blocks: torch.Tensor, config: PruneConfig,
                       target: PruneTarget) -> dict[int, LayerScores]:
    """Group scores of every pruned layer from one pass over ``blocks`` (the model is left as it was)."""
    spec, shape = spec_for(model.config), LayerShape.from_config(model.config)
    work = copy.deepcopy(model)
    if config.criterion == "lora":
        work = wrap_with_lora(work, config, spec)  # fresh adapters: B = 0, so G = ∇B·A
    elif needs_weight_gradients(config.criterion):
        for name in spec.projection_names:
            for parameter in (p for n, p in work.named_parameters() if f".{name}." in n):
                parameter.requires_grad_(True)
    work.train()
    if config.criterion in ("lora", "grad"):
        for block in blocks.split(config.batch_size):
            (compute_loss(work, block) / len(blocks)).backward()
    return model_scores(decoder_layers(work, spec), target.pruned_layers, spec, shape, target.attention_unit,
                        config.criterion, config.score_power, config.normalise_scores, config.seed,
                        config.lora_columns)


def masks_from_scores(scores: dict[int, LayerScores], shape: LayerShape, num_layers: int,
                      target: PruneTarget) -> ModelMasks:
    """Masks that remove exactly the target's units, the lowest-scored in each pruned layer."""
    masks = ModelMasks.full(shape, num_layers)
    for index, layer_scores in scores.items():
        update_layer_mask(masks.layers[index], layer_scores, shape, target.attention_unit,
                          target.attention_units_removed, target.ffn_channels_removed)
    return masks


def one_shot_masks(model: PreTrainedModel, blocks: torch.Tensor, config: PruneConfig,
                   target: PruneTarget) -> ModelMasks:
    """Score once on ``blocks`` with ``config.criterion`` and prune straight to ``target``."""
    shape = LayerShape.from_config(model.config)
    scores = calibration_scores(model, blocks, config, target)
    return masks_from_scores(scores, shape, model.config.num_hidden_layers, target)
