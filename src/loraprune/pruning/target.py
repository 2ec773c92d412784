"""Turn a whole-model sparsity into what the masks must remove.

Uniform allocation: the same counts of attention units and FFN channels in every pruned layer, so
the exported model keeps one config. Global allocation: one parameter budget for the whole model,
spent wherever units cost the least estimated loss per parameter (per-layer widths, which GGUF's
``deci`` architecture can hold but a transformers Llama config cannot).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from loraprune.config import PruneConfig
from loraprune.errors import LoraPruneError
from loraprune.models import count_parameters, projection_biases, spec_for
from loraprune.pruning.groups import AttentionUnit, LayerShape

log = logging.getLogger(__name__)

Allocation = Literal["auto", "uniform", "global"]  # auto: uniform unless the job resolves it


def structure_sizes(shape: LayerShape, attention_bias: bool, mlp_bias: bool) -> tuple[int, int, int]:
    """Parameters of one query head (q rows + o columns), one KV head (k, v rows), one FFN channel."""
    hidden, hd = shape.hidden_size, shape.head_dim
    query_head = 2 * hd * hidden + (hd if attention_bias else 0)
    kv_head = 2 * (hd * hidden + (hd if attention_bias else 0))
    ffn_channel = 3 * hidden + (2 if mlp_bias else 0)
    return query_head, kv_head, ffn_channel


@dataclass(frozen=True)
class UnitSizes:
    """Parameters removed with one unit of each kind, in one layer."""

    attention_unit: int
    ffn_channel: int

    @classmethod
    def of(cls, shape: LayerShape, unit: AttentionUnit, attention_bias: bool, mlp_bias: bool) -> UnitSizes:
        """Count q/k/v rows (+biases) and o columns of a unit; gate/up rows and a down column."""
        query_head, kv_head, ffn = structure_sizes(shape, attention_bias, mlp_bias)
        attention = shape.queries_per_kv * query_head + kv_head if unit == "kv_group" else query_head
        return cls(attention, ffn)


@dataclass(frozen=True)
class PruneTarget:
    """How many units each pruned layer loses, and what that achieves for the whole model."""

    pruned_layers: tuple[int, ...]
    attention_unit: AttentionUnit
    attention_units_removed: int  # per layer; for query_head: per KV group
    ffn_channels_removed: int  # per layer
    total_parameters: int
    removed_parameters: int

    @property
    def achieved_sparsity(self) -> float:
        return self.removed_parameters / self.total_parameters

    def describe(self, shape: LayerShape) -> str:
        """One line for the log: what is removed and the whole-model fraction it achieves."""
        if self.attention_unit == "kv_group":
            heads = (shape.num_kv_heads - self.attention_units_removed) * shape.queries_per_kv
        else:
            heads = (shape.queries_per_kv - self.attention_units_removed) * shape.num_kv_heads
        return (f"{len(self.pruned_layers)} layers pruned to {heads}/{shape.num_heads} query heads and "
                f"{shape.intermediate_size - self.ffn_channels_removed}/{shape.intermediate_size} FFN "
                f"channels: {self.removed_parameters:,} of {self.total_parameters:,} parameters removed "
                f"(whole-model sparsity {self.achieved_sparsity:.4f})")


@dataclass(frozen=True)
class GlobalTarget:
    """A parameter budget for the pruned layers together; each layer ends at its own widths."""

    pruned_layers: tuple[int, ...]
    attention_unit: AttentionUnit
    sizes: UnitSizes
    round_to: int
    total_parameters: int
    removed_parameters: int  # the budget; masks reach it to within one FFN channel
    layer_cap: int | None = None  # the most parameters one layer may lose (--max-layer-sparsity)

    @property
    def achieved_sparsity(self) -> float:
        return self.removed_parameters / self.total_parameters

    def describe(self, shape: LayerShape) -> str:
        """One line for the log: the budget and where it may be spent."""
        return (f"global allocation over {len(self.pruned_layers)} layers: {self.removed_parameters:,} of "
                f"{self.total_parameters:,} parameters removed where they cost least (whole-model sparsity "
                f"{self.achieved_sparsity:.4f}; every layer keeps at least one attention unit and "
                f"{min(self.round_to, shape.intermediate_size)} FFN channels"
                + ("" if self.layer_cap is None else f", and loses at most {self.layer_cap:,} parameters")
                + ")")


def layer_parameters(shape: LayerShape, sizes: UnitSizes, unit: AttentionUnit) -> int:
    """Parameters of one layer that pruning can remove: all attention units and FFN channels."""
    units = shape.num_kv_heads if unit == "kv_group" else shape.num_heads
    return units * sizes.attention_unit + shape.intermediate_size * sizes.ffn_channel


def pruned_layer_indices(num_layers: int, skip_first: int, skip_last: int) -> tuple[int, ...]:
    """Layers that are pruned once the first and last few are left alone."""
    return tuple(range(skip_first, num_layers - skip_last))


def _attention_choices(shape: LayerShape, unit: AttentionUnit) -> int:
    # At least one query head per KV group (and one KV group) must survive.
    return shape.num_kv_heads - 1 if unit == "kv_group" else shape.queries_per_kv - 1


def _attention_units_per_layer(removed: int, shape: LayerShape, unit: AttentionUnit) -> int:
    return removed if unit == "kv_group" else removed * shape.num_kv_heads


def solve_target(
    shape: LayerShape, num_layers: int, total_parameters: int, sparsity: float, *,
    unit: AttentionUnit = "kv_group", attention_fraction: float | None = None,
    skip_first: int = 0, skip_last: int = 0, round_to: int = 1,
    attention_bias: bool = False, mlp_bias: bool = False, allocation: Allocation = "uniform",
    max_layer_sparsity: float | None = None,
) -> PruneTarget | GlobalTarget:
    """Per-layer removal counts (uniform) or a whole-model budget (global) closest to ``sparsity``."""
    layers = pruned_layer_indices(num_layers, skip_first, skip_last)
    if not layers:
        raise LoraPruneError(f"--skip-first {skip_first} and --skip-last {skip_last} leave none of the "
                             f"{num_layers} layers to prune; lower them")
    if round_to > shape.intermediate_size:
        raise LoraPruneError(f"--round-to {round_to} is larger than the FFN width ({shape.intermediate_size}), so "
                             f"no FFN channel could be removed; use a --round-to of at most {shape.intermediate_size}")
    sizes = UnitSizes.of(shape, unit, attention_bias, mlp_bias)
    if allocation == "global":
        if attention_fraction is not None:
            raise LoraPruneError("--attention-fraction fixes the attention share of every layer; global "
                                 "allocation chooses it by score, so drop one of the two")
        _check_reachable(sparsity, shape, layers, num_layers, total_parameters, unit, round_to, sizes)
        budget = round(sparsity * total_parameters)
        per_layer = layer_parameters(shape, sizes, unit)
        cap = None if max_layer_sparsity is None else int(max_layer_sparsity * per_layer)
        if cap is not None and cap * len(layers) < budget:
            lowest = math.ceil(1000 * budget / (len(layers) * per_layer)) / 1000  # rounded up: the value named works
            raise LoraPruneError(f"--max-layer-sparsity {max_layer_sparsity} lets the {len(layers)} pruned layers "
                                 f"lose {cap * len(layers):,} parameters, fewer than the {budget:,} that --sparsity "
                                 f"{sparsity} removes; raise it to {lowest:.3f} or more")
        target = GlobalTarget(layers, unit, sizes, round_to, total_parameters, budget, cap)
        _warn_if_nothing_removed(sparsity, target.removed_parameters, min(sizes.ffn_channel, sizes.attention_unit),
                                 total_parameters)
        return target
    wanted = sparsity * total_parameters
    width = shape.intermediate_size
    kept_widths = [w for w in range(round_to, width + 1, round_to)] or [width]
    if width not in kept_widths:
        kept_widths.append(width)

    max_attention = _attention_choices(shape, unit)
    if attention_fraction is None:
        attention_options = range(max_attention + 1)
    else:
        units = shape.attention_units(unit) if unit == "kv_group" else shape.queries_per_kv
        attention_options = [min(max_attention, round(attention_fraction * units))]

    best, best_key = None, None
    for attention_removed in attention_options:
        units_per_layer = _attention_units_per_layer(attention_removed, shape, unit)
        attention_params = len(layers) * units_per_layer * sizes.attention_unit
        rest = wanted - attention_params
        kept = min(kept_widths, key=lambda w: abs(rest - len(layers) * (width - w) * sizes.ffn_channel))
        ffn_removed = width - kept
        removed = attention_params + len(layers) * ffn_removed * sizes.ffn_channel
        error = abs(removed - wanted)
        # Prefer hitting the target; among near-equal hits, the most balanced attention/FFN split.
        within_one_unit = error <= len(layers) * sizes.ffn_channel * round_to / 2 + 1e-9
        attention_share = attention_removed / max(1, max_attention + 1)
        balance = abs(attention_share - ffn_removed / width)
        key = (not within_one_unit, balance if within_one_unit else error)
        if best_key is None or key < best_key:
            best_key = key
            best = PruneTarget(layers, unit, attention_removed, ffn_removed, total_parameters, int(removed))

    _check_reachable(sparsity, shape, layers, num_layers, total_parameters, unit, round_to, sizes,
                     missed=best_key[0])
    smallest_attention = sizes.attention_unit * (1 if unit == "kv_group" else shape.num_kv_heads)
    _warn_if_nothing_removed(sparsity, best.removed_parameters,
                             len(layers) * min(sizes.ffn_channel * round_to, smallest_attention), total_parameters)
    return best


def _warn_if_nothing_removed(sparsity: float, removed: int, smallest_step: int, total_parameters: int) -> None:
    if removed < smallest_step:
        log.warning("loraprune: warning: --sparsity %s removes no parameter (the smallest step removes %d, %.2g "
                    "of the model); the run will only fine-tune", sparsity, smallest_step,
                    smallest_step / total_parameters)


def _check_reachable(sparsity: float, shape: LayerShape, layers: tuple[int, ...], num_layers: int,
                     total_parameters: int, unit: AttentionUnit, round_to: int, sizes: UnitSizes,
                     missed: bool = False) -> None:
    maximum = maximum_sparsity(shape, len(layers), total_parameters, unit, round_to, sizes)
    if sparsity > maximum + 1e-9 or missed:
        more_layers = " or prune more layers (lower --skip-first/--skip-last)" if len(layers) < num_layers else ""
        raise LoraPruneError(
            f"sparsity {sparsity} is not reachable: with {len(layers)} of {num_layers} layers pruned "
            f"(attention unit {unit}, round-to {round_to}) at most {maximum:.4f} of the parameters can "
            f"be removed; lower --sparsity{more_layers}")


def solve_model_target(model: nn.Module, config: PruneConfig) -> PruneTarget | GlobalTarget:
    """What the masks must remove for this model and config (fails early if unreachable)."""
    attention_bias, mlp_bias = projection_biases(model, spec_for(model.config))
    return solve_target(
        LayerShape.from_config(model.config), model.config.num_hidden_layers, count_parameters(model),
        config.sparsity, unit=config.attention_unit, attention_fraction=config.attention_fraction,
        skip_first=config.skip_first_layers, skip_last=config.skip_last_layers,
        round_to=1 if config.round_to is None else config.round_to,
        attention_bias=attention_bias, mlp_bias=mlp_bias, allocation=config.allocation,
        max_layer_sparsity=config.max_layer_sparsity)


def maximum_sparsity(shape: LayerShape, pruned_layers: int, total_parameters: int, unit: AttentionUnit,
                     round_to: int, sizes: UnitSizes) -> float:
    """The largest whole-model fraction removable while one unit of each kind survives per layer."""
    attention = _attention_units_per_layer(_attention_choices(shape, unit), shape, unit) * sizes.attention_unit
    min_kept = min(round_to, shape.intermediate_size)
    ffn = (shape.intermediate_size - min_kept) * sizes.ffn_channel
    return pruned_layers * (attention + ffn) / total_parameters
