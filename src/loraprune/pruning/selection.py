"""Choose which units to drop next: the lowest-scored of those still kept, never re-adding any.

Uniform targets: every pruned layer loses the same number of units, so the sliced model has one
config. Global targets: units of all pruned layers compete on score per parameter removed. Either
way each KV group keeps the same number of query heads as the others in its layer (GQA needs it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loraprune.pruning.groups import AttentionUnit, LayerShape, query_heads_of_units
from loraprune.pruning.masks import LayerMask, ModelMasks
from loraprune.pruning.scores import LayerScores
from loraprune.pruning.target import GlobalTarget, PruneTarget

log = logging.getLogger(__name__)


def shrink_masks(masks: ModelMasks, scores: dict[int, LayerScores], shape: LayerShape,
                 target: PruneTarget | GlobalTarget, fraction: float) -> None:
    """Shrink the masks in place until ``fraction`` of the target is removed (0 → 1)."""
    missing = [index for index in target.pruned_layers if index not in scores]
    if isinstance(target, GlobalTarget):
        if missing:  # a budget cannot be split fairly without every layer's scores
            log.warning("layers %s have no finite scores yet; masks wait for the next update", missing)
            return
        shrink_globally(masks, scores, shape, target, fraction)
        return
    for index in missing:
        log.warning("layer %d has no finite scores yet; its mask waits for the next update", index)
    for index in target.pruned_layers:
        if index not in missing:
            update_layer_mask(masks.layers[index], scores[index], shape, target.attention_unit,
                              round(fraction * target.attention_units_removed),
                              round(fraction * target.ffn_channels_removed))


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


@dataclass(frozen=True)
class _Removal:
    """One step a layer can take: drop these heads (or channels) of it, costing this much score."""

    cost: float  # score per parameter removed
    parameters: int
    layer: int
    kind: str  # "attention" or "ffn"
    position: int  # the layer's n-th step of this kind: steps must be taken in order
    indices: tuple[int, ...]  # query heads or FFN channels


def shrink_globally(masks: ModelMasks, scores: dict[int, LayerScores], shape: LayerShape,
                    target: GlobalTarget, fraction: float) -> None:
    """Drop the cheapest units of any pruned layer until ``fraction`` of the budget is removed.

    Units are ranked by score per parameter removed. Steps within a layer go from its lowest score
    up, so a layer only ever narrows; a step too large for what is left of the budget is passed
    over (with every later step of its layer and kind), which lands within one FFN channel. So is
    a step that would take its layer past ``target.layer_cap``.
    """
    removed_per_layer = {index: _removed_from_layer(masks.layers[index], shape, target)
                         for index in target.pruned_layers}
    budget = round(fraction * target.removed_parameters) - sum(removed_per_layer.values())
    removals = []
    for index in target.pruned_layers:
        mask, layer_scores = masks.layers[index], scores[index]
        removals += _attention_removals(index, mask, layer_scores.attention.float().cpu(), shape, target)
        removals += _ffn_removals(index, mask, layer_scores.ffn.float().cpu(), target)
    removals.sort(key=lambda removal: removal.cost)
    taken: dict[tuple[int, str], int] = {}
    for removal in removals:
        key = (removal.layer, removal.kind)
        if removal.position != taken.get(key, 0) or removal.parameters > budget:
            continue
        if target.layer_cap is not None and removed_per_layer[removal.layer] + removal.parameters > target.layer_cap:
            continue
        layer_mask = masks.layers[removal.layer]
        kept = layer_mask.heads if removal.kind == "attention" else layer_mask.ffn
        kept.index_fill_(0, torch.tensor(removal.indices, device=kept.device), False)
        budget -= removal.parameters
        removed_per_layer[removal.layer] += removal.parameters
        taken[key] = removal.position + 1


def _removed_from_layer(mask: LayerMask, shape: LayerShape, target: GlobalTarget) -> int:
    if target.attention_unit == "kv_group":
        attention = int((~mask.kv_heads(shape)).sum()) * target.sizes.attention_unit
    else:
        attention = int((~mask.heads).sum()) * target.sizes.attention_unit
    return attention + int((~mask.ffn).sum()) * target.sizes.ffn_channel


def _attention_removals(layer: int, mask: LayerMask, scores: torch.Tensor, shape: LayerShape,
                        target: GlobalTarget) -> list[_Removal]:
    """A layer's attention steps, cheapest first; one KV group (or query head per group) must stay."""
    kept = mask.heads.cpu().view(shape.num_kv_heads, shape.queries_per_kv)
    if target.attention_unit == "kv_group":
        groups = [g for g in torch.argsort(scores, stable=True).tolist() if kept[g].any()]
        size = target.sizes.attention_unit
        return [_Removal(float(scores[g]) / size, size, layer, "attention", position,
                         tuple(range(g * shape.queries_per_kv, (g + 1) * shape.queries_per_kv)))
                for position, g in enumerate(groups[:-1])]
    # One query head from every KV group at once keeps the groups equal.
    per_group = scores.view(shape.num_kv_heads, shape.queries_per_kv)
    columns = []
    for group, (group_kept, group_scores) in enumerate(zip(kept, per_group)):
        ranked = [h for h in torch.argsort(group_scores, stable=True).tolist() if group_kept[h]]
        columns.append([(float(group_scores[h]), group * shape.queries_per_kv + h) for h in ranked])
    size = shape.num_kv_heads * target.sizes.attention_unit
    steps = min(len(column) for column in columns) - 1
    removals = []
    for position in range(steps):
        picked = [column[position] for column in columns]
        removals.append(_Removal(sum(score for score, _ in picked) / size, size, layer, "attention", position,
                                 tuple(head for _, head in picked)))
    return removals


def _ffn_removals(layer: int, mask: LayerMask, scores: torch.Tensor, target: GlobalTarget) -> list[_Removal]:
    """A layer's FFN steps, cheapest first, each down to the next multiple of round_to (≥ round_to)."""
    kept = mask.ffn.cpu()
    channels = [c for c in torch.argsort(scores, stable=True).tolist() if kept[c]]
    step = min(target.round_to, kept.numel())
    width = len(channels)
    removals, start = [], 0
    level = (width - 1) // step * step  # the next kept width below this one
    while level >= step:
        chunk = channels[start:start + width - level]
        parameters = len(chunk) * target.sizes.ffn_channel
        removals.append(_Removal(float(scores[chunk].sum()) / parameters, parameters, layer, "ffn",
                                 len(removals), tuple(chunk)))
        start, width, level = start + len(chunk), level, level - step
    return removals
