"""Scorers that score every weight of a projection, then sum a unit's rows and columns.

Subclasses say how one projection's element scores are computed; grouping, per-matrix
normalisation and the choice of columns are shared here.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.pruning.groups import attention_scores, ffn_scores
from loraprune.pruning.scorers.base import Scorer
from loraprune.pruning.scores import LayerScores


class ElementScorer(Scorer):
    """Unit score = sum of element scores over the unit's q/k/v (gate/up) rows and o (down) columns."""

    @property
    def uses_columns(self) -> bool:
        """Whether o_proj/down_proj columns count (they do unless a criterion cannot see them)."""
        return True

    def element_scores(self, projection: nn.Module) -> torch.Tensor:
        """Float32 score of every weight of one projection, shape (out, in)."""
        raise NotImplementedError

    def step_scores(self) -> dict[int, LayerScores]:
        """Group sums of the element scores of every pruned layer."""
        layers = self._attached_layers()
        return {index: self._layer_scores(layers[index]) for index in self.plan.pruned_layers}

    def _layer_scores(self, layer: nn.Module) -> LayerScores:
        spec, normalise = self.plan.spec, self.config.normalise_scores
        attention, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        q, k, v = (self.element_scores(getattr(attention, name)) for name in (spec.q_proj, spec.k_proj, spec.v_proj))
        gate, up = (self.element_scores(getattr(mlp, name)) for name in (spec.gate_proj, spec.up_proj))
        o = self.element_scores(getattr(attention, spec.o_proj)) if self.uses_columns else None
        down = self.element_scores(getattr(mlp, spec.down_proj)) if self.uses_columns else None
        return LayerScores(attention_scores(q, k, v, o, self.plan.shape, self.plan.unit, normalise),
                           ffn_scores(gate, up, down, normalise))
