"""Where each kept head goes in a Nemotron-NAS (DeciLM) model, whose query-head count is global.

Every attention block has the same number of query-head slots; a block's own key/value heads each
serve `n_heads_in_group` consecutive slots. Kept heads fill slots, the rest stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraprune.errors import LoraPruneError
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask, ModelMasks

PAD = -1  # a slot that holds zeros


@dataclass(frozen=True)
class BlockLayout:
    """One decoder layer: the source query head of every slot and the source KV head of every KV slot."""

    query_sources: tuple[int, ...]  # (global heads,) source query head or PAD; empty = attention no_op
    kv_sources: tuple[int, ...]  # (stored kv heads,) source kv head or PAD
    ffn_sources: tuple[int, ...]  # kept FFN channels; empty = FFN no_op

    @property
    def attention_no_op(self) -> bool:
        return not self.query_sources

    @property
    def ffn_no_op(self) -> bool:
        return not self.ffn_sources

    @property
    def heads_in_group(self) -> int:
        return len(self.query_sources) // len(self.kv_sources)


def _kept_queries_per_kv(mask: LayerMask, shape: LayerShape) -> list[tuple[int, list[int]]]:
    """(kept kv head, its kept query heads) for every kept kv head, in order."""
    kept = []
    for kv in range(shape.num_kv_heads):
        queries = [kv * shape.queries_per_kv + i for i in range(shape.queries_per_kv)
                   if bool(mask.heads[kv * shape.queries_per_kv + i])]
        if queries:
            kept.append((kv, queries))
    return kept


def _group_size(global_heads: int, kv_heads: int, widest_group: int) -> int | None:
    """The largest group size ≥ widest_group dividing global_heads into ≥ kv_heads groups, or None."""
    for group in range(global_heads // kv_heads, widest_group - 1, -1):
        if global_heads % group == 0:
            return group
    return None


def _padded_units(global_heads: int, groups: list[list[tuple[int, list[int]]]]) -> int | None:
    """Zero query slots plus zero KV heads (weighted 2: k and v) needed at `global_heads`, or None."""
    padding = 0
    for kept in groups:
        if not kept:
            continue
        group = _group_size(global_heads, len(kept), max(len(q) for _, q in kept))
        if group is None:
            return None
        queries = sum(len(q) for _, q in kept)
        padding += (global_heads - queries) + 2 * (global_heads // group - len(kept))
    return padding


def plan_layout(masks: ModelMasks, shape: LayerShape) -> list[BlockLayout]:
    """Place every layer's kept heads in the fewest zero-padded slots the format allows."""
    groups = [_kept_queries_per_kv(mask, shape) for mask in masks.layers]
    if not any(groups):
        raise LoraPruneError("masks remove every attention head of every layer; lower the target sparsity")
    first = next(i for i, (kept, mask) in enumerate(zip(groups, masks.layers)) if kept or bool(mask.ffn.any()))
    if not groups[first]:
        # vLLM's DeciLM starts the residual stream at the first attention; an FFN before it crashes.
        raise LoraPruneError(f"layer {first}, the first layer that computes anything, keeps FFN channels but "
                             "no attention head, which vLLM's DeciLM cannot run; keep its attention "
                             "(e.g. --skip-first)")
    smallest = max(len(kept) * max(len(q) for _, q in kept) for kept in groups if kept)
    candidates = [(_padded_units(h, groups), h) for h in range(smallest, shape.num_heads + 1)]
    _, global_heads = min((padding, h) for padding, h in candidates if padding is not None)
    return [_block_layout(kept, mask, global_heads) for kept, mask in zip(groups, masks.layers)]


def _block_layout(kept: list[tuple[int, list[int]]], mask: LayerMask, global_heads: int) -> BlockLayout:
    ffn = tuple(mask.ffn.nonzero().flatten().tolist())
    if not kept:
        return BlockLayout((), (), ffn)
    group = _group_size(global_heads, len(kept), max(len(q) for _, q in kept))
    query_sources = [PAD] * global_heads
    kv_sources = [PAD] * (global_heads // group)
    for slot, (kv, queries) in enumerate(kept):
        kv_sources[slot] = kv
        query_sources[slot * group: slot * group + len(queries)] = queries
    return BlockLayout(tuple(query_sources), tuple(kv_sources), ffn)
