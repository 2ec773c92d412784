"""BlockStream: sample i is fixed by (seed, i), so batches replay on resume and shard across ranks."""

from __future__ import annotations

import torch

from loraprune.data.sampling import BlockStream

NUM_BLOCKS = 10


def numbered_blocks() -> torch.Tensor:
    """Ten blocks of four tokens; block i holds 10*i ... 10*i + 3, so a row names its block."""
    return torch.arange(NUM_BLOCKS)[:, None] * 10 + torch.arange(4)


def block_ids(batches: list[torch.Tensor]) -> list[int]:
    return torch.cat(batches)[:, 0].div(10, rounding_mode="floor").tolist()


def take(stream: BlockStream, count: int) -> list[torch.Tensor]:
    return [stream.next_batch() for _ in range(count)]


def test_same_seed_gives_the_same_batches_and_another_seed_another_order():
    first = take(BlockStream(numbered_blocks(), seed=3, batch_size=2), 5)
    again = take(BlockStream(numbered_blocks(), seed=3, batch_size=2), 5)
    other = take(BlockStream(numbered_blocks(), seed=4, batch_size=2), 5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (2, 4)
    assert block_ids(first) != block_ids(other)
    assert sorted(block_ids(first)) == sorted(block_ids(other)) == list(range(NUM_BLOCKS))


def test_each_epoch_visits_every_block_exactly_once_in_a_new_order():
    ids = block_ids(take(BlockStream(numbered_blocks(), seed=0, batch_size=3), 10))  # 30 samples = 3 epochs
    epochs = [ids[i:i + NUM_BLOCKS] for i in range(0, 30, NUM_BLOCKS)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_BLOCKS))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_a_batch_crossing_the_epoch_boundary_ends_one_epoch_and_starts_the_next():
    whole_epochs = take(BlockStream(numbered_blocks(), seed=5, batch_size=NUM_BLOCKS), 2)
    epoch_0, epoch_1 = block_ids(whole_epochs[:1]), block_ids(whole_epochs[1:])
    stream = BlockStream(numbered_blocks(), seed=5, batch_size=4)
    take(stream, 2)  # samples 0-7
    crossing = block_ids([stream.next_batch()])  # samples 8, 9 | 10, 11
    assert crossing == epoch_0[8:] + epoch_1[:2]
    assert stream.samples_seen == 12


def test_stream_recreated_at_samples_seen_continues_as_the_original():
    original = BlockStream(numbered_blocks(), seed=1, batch_size=3)
    take(original, 2)
    assert original.samples_seen == 6
    resumed = BlockStream(numbered_blocks(), seed=1, batch_size=3, samples_seen=6)
    for a, b in zip(take(original, 7), take(resumed, 7)):  # on into the third epoch
        assert torch.equal(a, b)
    assert resumed.samples_seen == original.samples_seen == 27


def test_two_ranks_together_give_the_single_process_batch_of_twice_the_size():
    single = BlockStream(numbered_blocks(), seed=2, batch_size=4)
    rank_0 = BlockStream(numbered_blocks(), seed=2, batch_size=2, rank=0, world_size=2)
    rank_1 = BlockStream(numbered_blocks(), seed=2, batch_size=2, rank=1, world_size=2)
    for _ in range(6):  # 24 samples: across two epoch boundaries
        assert torch.equal(torch.cat([rank_0.next_batch(), rank_1.next_batch()]), single.next_batch())
    assert rank_0.samples_seen == rank_1.samples_seen == single.samples_seen == 24
