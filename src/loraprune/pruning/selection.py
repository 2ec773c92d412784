"""Choose which units to drop next: the lowest-scored of those still kept, never re-adding any.

Every pruned layer loses the same number of units (and, at query-head granularity, the same number
of query heads per KV group), so the sliced model has one config.
"""

from __future__ import annotations

import torch

from loraprune.pruning.groups import AttentionUnit, LayerShape, query_heads_of_units
from loraprune.pruning.masks import LayerMask
from loraprune.pruning.scores import LayerScores


def _drop_lowest(kept: torch.Tensor, scores: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Keep the ``keep_count`` best-scored of the currently kept entries (ties: lower index)."""
    # Everything stays on the masks' device and nothing is read back to the host: dropped entries
    # rank below every kept one, and `& kept` discards them if fewer than keep_count are kept.
    ranked = scores.float().masked_fill(~kept, float("-inf"))
    order = torch.argsort(ranked, descending=True, stable=True)
    best = torch.zeros_like(kept).index_fill_(0, order[:keep_count], True)
    return best & kept


def update_layer_mask(mask: LayerMask, scores: LayerScores, shape: LayerShape, unit: AttentionUnit,
                      attention_removed: int, ffn_removed: int) -> None:
    """Shrink one layer's mask in place to the given removal counts."""
    if unit == "kv_group":
        kept_units = mask.heads.view(shape.num_kv_heads, shape.queries_per_kv).any(dim=1)
        kept_units = _drop_lowest(kept_units, scores.attention, shape.num_kv_heads - attention_removed)
        mask.heads.copy_(query_heads_of_units(kept_units, shape, unit) & mask.heads)
    else:
        per_group_kept = mask.heads.view(shape.num_kv_heads, shape.queries_per_kv)
        per_group_scores = scores.attention.view(shape.num_kv_heads, shape.queries_per_kv)
        keep = shape.queries_per_kv - attention_removed
        rows = [_drop_lowest(k, s, keep) for k, s in zip(per_group_kept, per_group_scores)]
        mask.heads.copy_(torch.stack(rows).flatten())
    mask.ffn.copy_(_drop_lowest(mask.ffn, scores.ffn, shape.intermediate_size - ffn_removed))
