"""Random importance: a fixed random ranking per layer, the floor any criterion must beat."""

from __future__ import annotations

import torch

from loraprune.pruning.scorers.base import Scorer, register_scorer
from loraprune.pruning.scores import LayerScores


def random_group_scores(num_groups: int, seed: int, layer_index: int, kind: str) -> torch.Tensor:
    """Scores drawn once per (seed, layer, kind), so the ranking does not drift between updates."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_index * 2 + (kind == "ffn"))
    return torch.rand(num_groups, generator=generator)


@register_scorer("random")
class RandomScorer(Scorer):
    """Baseline: a seeded random ranking of each layer's units."""

    needs_backward = False

    def step_scores(self) -> dict[int, LayerScores]:
        device = next(self._attached_layers().parameters()).device
        shape, seed = self.plan.shape, self.config.seed
        return {index: LayerScores(
                    random_group_scores(shape.attention_units(self.plan.unit), seed, index, "attention").to(device),
                    random_group_scores(shape.intermediate_size, seed, index, "ffn").to(device))
                for index in self.plan.pruned_layers}
