"""Random importance: a fixed random ranking per layer, the floor any criterion must beat."""

from __future__ import annotations

import torch


def random_group_scores(num_groups: int, seed: int, layer_index: int, kind: str) -> torch.Tensor:
    """Scores drawn once per (seed, layer, kind), so the ranking does not drift between updates."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_index * 2 + (kind == "ffn"))
    return torch.rand(num_groups, generator=generator)
