"""A deterministic, resumable stream of training blocks, from one source or several mixed.

Sample i of the stream is fixed by (seed, i) alone: with k sources, sample i comes from source
i mod k (so two sources alternate block by block), at position i div k of that source's own
stream, where epoch e of each source is a seeded permutation of its blocks. A run resumed at
sample i therefore sees exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SOURCE_SEED_STRIDE = 1_000_003  # keeps the sources' permutations apart; source 0 keeps the old seeds


class BlockStream:
    """Endless shuffled batches of token blocks, sharded across processes; several sources alternate."""

    def __init__(self, blocks: torch.Tensor | Sequence[torch.Tensor], seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, samples_seen: int = 0):
        sources = [blocks] if isinstance(blocks, torch.Tensor) else list(blocks)
        if any(source.ndim == 3 for source in sources):  # (n, 2, seq_len) ids + labels: label the rest alike
            sources = [source if source.ndim == 3 else torch.stack([source, source], dim=1) for source in sources]
        self.sources = sources
        if len({tuple(source.shape[1:]) for source in self.sources}) != 1:
            raise ValueError("all block sources need the same block length")
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.samples_seen = samples_seen
        self._orders: dict[int, tuple[int, torch.Tensor]] = {}

    def source_of(self, sample: int) -> int:
        """Which source sample `sample` of the stream is drawn from."""
        return sample % len(self.sources)

    def _block(self, sample: int) -> torch.Tensor:
        source = self.source_of(sample)
        blocks = self.sources[source]
        epoch, position = divmod(sample // len(self.sources), len(blocks))
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch + source * SOURCE_SEED_STRIDE)
            cached = self._orders[source] = (epoch, torch.randperm(len(blocks), generator=generator))
        return blocks[int(cached[1][position])]

    def next_batch(self) -> torch.Tensor:
        """This process's share of the next global batch, (batch_size, seq_len) or, labelled, (batch_size, 2, seq_len)."""
        first = self.samples_seen + self.rank * self.batch_size
        batch = torch.stack([self._block(first + i) for i in range(self.batch_size)])
        self.samples_seen += self.batch_size * self.world_size
        return batch
