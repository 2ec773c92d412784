"""Scorers that score every weight of a projection, then sum a unit's rows and columns.

Subclasses say how one projection's element scores are computed; grouping, per-matrix
normalisation and the choice of columns are shared here.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.pruning.groups import attention_scores, ffn_scores
from loraprune.pruning.scorers.base import Scorer
from loraprune.pruning.scorers.weights import ALL_ROWS, out_features
from loraprune.pruning.scores import LayerScores

# Element scores are made and summed a block of rows at a time: at LLaMA-7B shapes a whole
# projection's float32 scores (and the temporaries that make them) would be 180 MiB each.
ROWS_PER_BLOCK = 256


class ElementScorer(Scorer):
    """Unit score = sum of element scores over the unit's q/k/v (gate/up) rows and o (down) columns."""

    @property
    def uses_columns(self) -> bool:
        """Whether o_proj/down_proj columns count (they do unless a criterion cannot see them)."""
        return True

    def element_scores(self, projection: nn.Module, rows: slice = ALL_ROWS) -> torch.Tensor:
        """Float32 score of every weight in ``rows`` of one projection, shape (rows, in)."""
        raise NotImplementedError

    def step_scores(self) -> dict[int, LayerScores]:
        """Group sums of the element scores of every pruned layer."""
        layers = self._attached_layers()
        return {index: self._layer_scores(layers[index]) for index in self.plan.pruned_layers}

    def row_sums(self, projection: nn.Module) -> torch.Tensor:
        """Element scores summed over each row, shape (out, 1), built a block of rows at a time."""
        return torch.cat([self.element_scores(projection, block).sum(dim=1, keepdim=True)
                          for block in _row_blocks(projection)])

    def column_sums(self, projection: nn.Module) -> torch.Tensor:
        """Element scores summed over each column, shape (1, in), built a block of rows at a time."""
        total = None
        for block in _row_blocks(projection):
            sums = self.element_scores(projection, block).sum(dim=0, keepdim=True)
            total = sums if total is None else total + sums
        return total

    def _layer_scores(self, layer: nn.Module) -> LayerScores:
        # Row sums (out, 1) and column sums (1, in) keep their second dimension, so the group
        # functions, which sum an element-score matrix over rows or columns, give the same values.
        spec, normalise = self.plan.spec, self.config.normalise_scores
        attention, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        q, k, v = (self.row_sums(getattr(attention, name)) for name in (spec.q_proj, spec.k_proj, spec.v_proj))
        gate, up = (self.row_sums(getattr(mlp, name)) for name in (spec.gate_proj, spec.up_proj))
        o = self.column_sums(getattr(attention, spec.o_proj)) if self.uses_columns else None
        down = self.column_sums(getattr(mlp, spec.down_proj)) if self.uses_columns else None
        return LayerScores(attention_scores(q, k, v, o, self.plan.shape, self.plan.unit, normalise),
                           ffn_scores(gate, up, down, normalise))


def _row_blocks(projection: nn.Module) -> list[slice]:
    rows = out_features(projection)
    return [slice(start, min(start + ROWS_PER_BLOCK, rows)) for start in range(0, rows, ROWS_PER_BLOCK)]
