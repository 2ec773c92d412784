"""A deterministic, resumable stream of training blocks.

Sample i of the stream is fixed by (seed, i) alone: epoch e is a seeded permutation of the blocks,
so a run resumed at sample i sees exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch


class BlockStream:
    """Endless shuffled batches of token blocks, sharded across processes."""

    def __init__(self, blocks: torch.Tensor, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, samples_seen: int = 0):
        self.blocks = blocks
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.samples_seen = samples_seen
        self._epoch, self._order = -1, None

    def _block_index(self, sample: int) -> int:
        epoch, position = divmod(sample, len(self.blocks))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.blocks), generator=generator)
        return int(self._order[position])

    def next_batch(self) -> torch.Tensor:
        """This process's share of the next global batch, shape (batch_size, seq_len)."""
        first = self.samples_seen + self.rank * self.batch_size
        indices = [self._block_index(first + i) for i in range(self.batch_size)]
        self.samples_seen += self.batch_size * self.world_size
        return self.blocks[indices]
