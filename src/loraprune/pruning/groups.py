"""Prunable structures of a decoder layer and how their weights are coupled.

An attention unit is a key/value head with every query head that shares it (or, at query-head
granularity, one query head); an FFN channel is a gate row, an up row and a down column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

AttentionUnit = Literal["kv_group", "query_head"]


@dataclass(frozen=True)
class LayerShape:
    """Head counts and widths of one decoder layer, as read from the model config."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def from_config(cls, config) -> LayerShape:
        """Read the shape from a transformers config (honours an explicit ``head_dim``)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
        )

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def attention_units(self, unit: AttentionUnit) -> int:
        """How many attention units of this granularity one layer has."""
        return self.num_kv_heads if unit == "kv_group" else self.num_heads


def row_scores(element_scores: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """Sum an (out, in) score matrix over row blocks: one score per group of output rows."""
    per_row = element_scores.sum(dim=1)
    return per_row.view(-1, rows_per_group).sum(dim=1)


def column_scores(element_scores: torch.Tensor, columns_per_group: int) -> torch.Tensor:
    """Sum an (out, in) score matrix over column blocks: one score per group of input columns."""
    per_column = element_scores.sum(dim=0)
    return per_column.view(-1, columns_per_group).sum(dim=1)


def _normalised(scores: torch.Tensor, normalise: bool) -> torch.Tensor:
    # The reference code divides each matrix's group scores by their L2 norm before summing, so
    # that q/k/v/o (or gate/up/down) weigh in equally whatever their scale.
    if not normalise:
        return scores
    norm = scores.norm()
    return scores / torch.where(norm > 0, norm, 1.0)  # on the device: no host read of the norm


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor | None,
    shape: LayerShape, unit: AttentionUnit, normalise: bool = True,
) -> torch.Tensor:
    """Group scores of a layer's attention units from the element scores of q, k, v and o (optional)."""
    hd = shape.head_dim
    query_heads = _normalised(row_scores(q, hd), normalise)  # (num_heads,)
    if o is not None:
        query_heads = query_heads + _normalised(column_scores(o, hd), normalise)
    if unit == "query_head":
        return query_heads
    kv_heads = _normalised(row_scores(k, hd), normalise) + _normalised(row_scores(v, hd), normalise)
    return query_heads.view(shape.num_kv_heads, shape.queries_per_kv).sum(dim=1) + kv_heads


def ffn_scores(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor | None, normalise: bool = True
) -> torch.Tensor:
    """Group scores of a layer's FFN channels from the element scores of gate, up and down (optional)."""
    scores = _normalised(row_scores(gate, 1), normalise) + _normalised(row_scores(up, 1), normalise)
    if down is not None:
        scores = scores + _normalised(column_scores(down, 1), normalise)
    return scores


def query_heads_of_units(units_kept: torch.Tensor, shape: LayerShape, unit: AttentionUnit) -> torch.Tensor:
    """Expand a kept-mask over attention units into a kept-mask over query heads."""
    if unit == "query_head":
        return units_kept
    return units_kept.repeat_interleave(shape.queries_per_kv)


def kv_heads_kept(query_heads_kept: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """A key/value head stays while at least one query head that reads it stays."""
    return query_heads_kept.view(shape.num_kv_heads, shape.queries_per_kv).any(dim=1)
