"""Group scores of every pruned layer, and their moving average over optimizer steps.

Data flows: projection element scores (criteria/) → group sums (groups.py) → moving average.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from loraprune.criteria import ELEMENT_SCORERS, random_group_scores
from loraprune.groups import AttentionUnit, LayerShape, attention_scores, ffn_scores
from loraprune.models import ArchSpec

log = logging.getLogger(__name__)


@dataclass
class LayerScores:
    """Scores of one layer's attention units and FFN channels."""

    attention: torch.Tensor  # (units,)
    ffn: torch.Tensor  # (intermediate_size,)


def layer_scores(layer: nn.Module, layer_index: int, spec: ArchSpec, shape: LayerShape,
                 unit: AttentionUnit, criterion: str, score_power: str = "square",
                 normalise: bool = True, seed: int = 0, lora_columns: bool = False) -> LayerScores:
    """Score one decoder layer's units with the named criterion."""
    if criterion == "random":
        return LayerScores(
            random_group_scores(shape.attention_units(unit), seed, layer_index, "attention"),
            random_group_scores(shape.intermediate_size, seed, layer_index, "ffn"))
    scorer = ELEMENT_SCORERS[criterion]
    attention, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
    q, k, v = (scorer(getattr(attention, name), score_power) for name in (spec.q_proj, spec.k_proj, spec.v_proj))
    gate, up = (scorer(getattr(mlp, name), score_power) for name in (spec.gate_proj, spec.up_proj))
    # G = ∇B·A + … mixes the input columns of W through AᵀA (rank r), so the lora estimate says
    # next to nothing about o_proj/down_proj columns (measured rank correlation with the true
    # Taylor score ≈ 0, against 0.7-0.85 for q/gate/up rows); by default those columns are left out.
    use_columns = criterion != "lora" or lora_columns
    o = scorer(getattr(attention, spec.o_proj), score_power) if use_columns else None
    down = scorer(getattr(mlp, spec.down_proj), score_power) if use_columns else None
    return LayerScores(attention_scores(q, k, v, o, shape, unit, normalise),
                       ffn_scores(gate, up, down, normalise))


@dataclass
class MovingAverageScores:
    """Exponential moving average of group scores (paper Eq. 12), one entry per pruned layer."""

    decay: float
    layers: dict[int, LayerScores] = field(default_factory=dict)
    skipped_updates: int = 0

    def update(self, fresh: dict[int, LayerScores]) -> bool:
        """Fold in one step's scores; a non-finite update is skipped, logged, and returns False."""
        if not all(torch.isfinite(s.attention).all() and torch.isfinite(s.ffn).all() for s in fresh.values()):
            self.skipped_updates += 1
            log.warning("non-finite importance scores; moving-average update skipped (%d so far)",
                        self.skipped_updates)
            return False
        for index, scores in fresh.items():
            old = self.layers.get(index)
            if old is None:
                self.layers[index] = LayerScores(scores.attention.clone(), scores.ffn.clone())
            else:
                old.attention.mul_(self.decay).add_(scores.attention, alpha=1 - self.decay)
                old.ffn.mul_(self.decay).add_(scores.ffn, alpha=1 - self.decay)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors."""
        tensors = {"skipped_updates": torch.tensor(self.skipped_updates)}
        for index, scores in self.layers.items():
            tensors[f"layers.{index}.attention"] = scores.attention
            tensors[f"layers.{index}.ffn"] = scores.ffn
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.skipped_updates = int(tensors.get("skipped_updates", torch.tensor(0)))
        indices = {int(k.split(".")[1]) for k in tensors if k.startswith("layers.")}
        self.layers = {i: LayerScores(tensors[f"layers.{i}.attention"].clone(),
                                      tensors[f"layers.{i}.ffn"].clone()) for i in sorted(indices)}


def model_scores(layers: nn.ModuleList, pruned_layers: tuple[int, ...], spec: ArchSpec,
                 shape: LayerShape, unit: AttentionUnit, criterion: str, score_power: str,
                 normalise: bool, seed: int, lora_columns: bool = False) -> dict[int, LayerScores]:
    """Scores of every pruned layer."""
    return {i: layer_scores(layers[i], i, spec, shape, unit, criterion, score_power, normalise, seed,
                            lora_columns) for i in pruned_layers}
