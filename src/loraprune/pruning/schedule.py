"""When masks change and how much is pruned by then: the cubic ramp of the paper.

Steps count completed optimizer steps, 1..total. The ramp starts after warm-up, reaches the full
target exactly at ``end_step``, and masks stay frozen during the cool-down that follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraprune.errors import LoraPruneError

if TYPE_CHECKING:
    from loraprune.config import PruneConfig


@dataclass(frozen=True)
class PruningSchedule:
    """Cubic sparsity ramp (Zhu & Gupta, 2017) with mask updates every ``prune_every`` steps."""

    total_steps: int
    start_step: int
    end_step: int
    prune_every: int

    @classmethod
    def build(cls, total_steps: int, warmup_fraction: float, cooldown_fraction: float,
              prune_every: int) -> PruningSchedule:
        """Place the ramp between warm-up and cool-down; fail if there is no room for it."""
        start = round(warmup_fraction * total_steps)
        end = total_steps - round(cooldown_fraction * total_steps)
        if end <= start:
            needed = 1 + max(2, round(1 / max(1e-9, 1 - warmup_fraction - cooldown_fraction)))
            raise LoraPruneError(
                f"--steps {total_steps} leaves no step for pruning between warm-up and cool-down; "
                f"use --steps {needed} or more")
        return cls(total_steps, start, end, prune_every)

    @classmethod
    def for_config(cls, config: PruneConfig) -> PruningSchedule:
        """The schedule a run with ``config`` follows."""
        return cls.build(config.steps, config.warmup_fraction, config.cooldown_fraction, config.prune_every)

    def scores_after(self, completed: int, every: int = 1) -> bool:
        """Whether the step that follows ``completed`` steps is scored: every ``every``-th until the ramp ends."""
        return completed < self.end_step and completed % every == 0

    def scored_steps(self, before: int | None = None, every: int = 1) -> int:
        """How many of the first ``before`` steps (default: all) are scored, scoring every ``every``-th."""
        steps = self.end_step if before is None else min(before, self.end_step)
        return -(-steps // every)

    def fraction(self, step: int) -> float:
        """Share of the final target pruned after ``step`` optimizer steps (0 → 1)."""
        if step <= self.start_step:
            return 0.0
        if step >= self.end_step:
            return 1.0
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return 1.0 - (1.0 - progress) ** 3

    def updates_masks(self, step: int) -> bool:
        """Whether masks are recomputed after ``step``; always at the end of the ramp."""
        if step == self.end_step:
            return True
        return self.start_step < step < self.end_step and (step - self.start_step) % self.prune_every == 0

    def update_steps(self) -> list[int]:
        """Every step at which masks change."""
        return [s for s in range(1, self.total_steps + 1) if self.updates_masks(s)]
