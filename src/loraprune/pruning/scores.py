"""Group scores of a layer, and their moving average over optimizer steps (paper Eq. 12).

Scores are float32 and live on the model's device, whatever the weights' dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class LayerScores:
    """Scores of one layer's attention units and FFN channels."""

    attention: torch.Tensor  # (units,) float32
    ffn: torch.Tensor  # (intermediate_size,) float32

    def is_finite(self) -> bool:
        """Whether every score is a finite number."""
        return bool(torch.isfinite(self.attention).all() and torch.isfinite(self.ffn).all())


@dataclass
class MovingAverageScores:
    """Exponential moving average of group scores, one entry per pruned layer."""

    decay: float
    layers: dict[int, LayerScores] = field(default_factory=dict)
    skipped_updates: int = 0

    def update(self, fresh: dict[int, LayerScores]) -> bool:
        """Fold in one step's scores; a non-finite update is skipped, logged, and returns False."""
        if not all(scores.is_finite() for scores in fresh.values()):
            self.skipped_updates += 1
            log.warning("non-finite importance scores; moving-average update skipped (%d so far)",
                        self.skipped_updates)
            return False
        for index, scores in fresh.items():
            old = self.layers.get(index)
            if old is None:
                self.layers[index] = LayerScores(scores.attention.float().clone(), scores.ffn.float().clone())
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

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Inverse of :meth:`state_dict`; the averages are put on ``device`` (the model's)."""
        self.skipped_updates = int(tensors.get("skipped_updates", torch.tensor(0)))
        indices = {int(k.split(".")[1]) for k in tensors if k.startswith("layers.")}
        self.layers = {i: LayerScores(tensors[f"layers.{i}.attention"].to(device, torch.float32, copy=True),
                                      tensors[f"layers.{i}.ffn"].to(device, torch.float32, copy=True))
                       for i in sorted(indices)}
