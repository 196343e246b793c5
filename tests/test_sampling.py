"""The epoch samplers at scale: per-rank shares are views of one order, iteration stays small."""
import tracemalloc

import pytest
import torch

from avidfast.data.sampling import ShardedEpochSampler, epoch_order
from avidfast.data.shards.order import ShardGroupedSampler, shard_epoch_order


@pytest.mark.parametrize("videos", [200_000, 200_003])  # 64 divides 200_000 but not 200_003
def test_rank_shares_are_views_of_one_order(videos):
    order = epoch_order(videos, epoch=2, seed=7)
    world = 64
    per_rank = -(-videos // world)
    assert order.untyped_storage().nbytes() == videos * 8  # one order for the epoch
    shares = []
    for rank in range(world):
        share = ShardedEpochSampler(videos, rank=rank, world_size=world, seed=7).rank_order(order)
        assert share.numel() == per_rank
        padded = rank + (per_rank - 1) * world >= videos
        # a share reads the order's own memory (a strided view); only a padded share is a copy
        assert (share.untyped_storage().data_ptr() == order.untyped_storage().data_ptr()) == (not padded)
        shares.append(share)
    assert sum(1 for r in range(world) if r + (per_rank - 1) * world >= videos) == per_rank * world - videos
    assert set(torch.cat(shares).tolist()) == set(range(videos))


def test_iterating_a_rank_allocates_no_copy_of_the_order_as_python_objects():
    videos, world = 200_000, 64
    sampler = ShardedEpochSampler(videos, rank=5, world_size=world, seed=1)
    sampler.set_epoch(3)
    tracemalloc.start()
    count = sum(1 for _ in sampler)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == -(-videos // world)
    # the order as a Python list would take > 1.6 MB (8 bytes a pointer) plus the int objects
    assert peak < 1_000_000, peak


def test_shard_ranks_read_contiguous_views():
    shard_of = torch.arange(100_000) // 1000
    order = shard_epoch_order(shard_of, 100, epoch=1, seed=3)
    sampler = ShardGroupedSampler(shard_of, rank=3, world_size=8, seed=3, batch_size=16, workers=4)
    block = sampler.block(order)
    assert block.untyped_storage().data_ptr() == order.untyped_storage().data_ptr()
    assert sorted(order.tolist()) == list(range(100_000))
    sampler.set_epoch(1)
    tracemalloc.start()
    count = sum(1 for _ in sampler)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 12_500 and peak < 1_000_000, peak


def test_epoch_order_matches_the_list_it_replaces():
    # samples_per_epoch longer than the data set continues through fresh permutations
    order = epoch_order(10, 4, 0, clips_per_video=2, samples_per_epoch=45).tolist()
    assert len(order) == 45
    for start in (0, 20):
        assert sorted(order[start:start + 20]) == sorted(list(range(10)) * 2)
    assert epoch_order(10, 4, 0, shuffle=False).tolist() == list(range(10))
