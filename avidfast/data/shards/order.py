"""Which samples of a shard folder each rank and loader worker reads in an epoch.

The epoch's global order visits the shards in a random order (seeded by run seed and epoch) and
the samples of each shard in a random order, one shard after the other; without shuffling, shards
and samples keep the index's order. Rank r reads the contiguous block of positions
[r * per_rank, (r + 1) * per_rank) of that order, per_rank = ceil(N / world_size), so a rank
touches only the shards of its block. Padding rule: when world_size does not divide N, the last
block runs past the end and wraps to the start of the order, so fewer than world_size samples are
read twice in the epoch and every rank reads per_rank (what DistributedDataParallel needs).

Within a rank, the DataLoader hands batch k of an epoch to worker k mod W. The block's full
batches are therefore dealt so that the batches of worker w are one contiguous stretch of the
block: each worker reads its own run of shards, and the shard files it opens stay few. A last,
partial batch comes last. The position of a sample (its place in the global order) seeds its
augmentation, exactly as in :mod:`avidfast.data.sampling`; the memory slot is read from the
sample itself (its JSON member), never derived from the position.
"""
from typing import Iterator, Sequence

import torch

from avidfast.data.sampling import iterate_pairs, sample_seed


def shard_epoch_order(sample_shards: torch.Tensor, num_shards: int, epoch: int, seed: int,
                      shuffle: bool = True) -> torch.Tensor:
    """The epoch's global order of sample numbers (int64, length N), grouped by shard.

    sample_shards: (N,) int64, the shard of every sample.
    """
    count = sample_shards.numel()
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(sample_seed(seed, epoch, -2, 0))
        shard_rank = torch.empty(num_shards, dtype=torch.int64)
        shard_rank[torch.randperm(num_shards, generator=generator)] = torch.arange(num_shards)
        within = torch.randperm(count, generator=generator)
    else:
        shard_rank = torch.arange(num_shards)
        within = torch.arange(count)
    return torch.argsort(shard_rank[sample_shards] * count + within)


class ShardGroupedSampler(torch.utils.data.Sampler):
    """Yields (position, sample number) pairs of one rank in the order its DataLoader needs (module
    docstring). ``set_epoch(epoch, skip)`` resumes after this rank's first ``skip`` samples (a
    multiple of ``batch_size``)."""

    def __init__(self, sample_shards: Sequence[int], *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, batch_size: int = 1, workers: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 = {world_size - 1}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sample_shards = torch.as_tensor(sample_shards, dtype=torch.int64)
        if self.sample_shards.numel() == 0:
            raise ValueError("the shard index lists no samples")
        self.num_shards = int(self.sample_shards.max()) + 1
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batch_size, self.streams = batch_size, max(1, workers)
        self.per_rank = -(-self.sample_shards.numel() // world_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.per_rank or (skip % self.batch_size and skip != self.per_rank):
            raise ValueError(f"skip must be a multiple of batch_size {self.batch_size} in [0, {self.per_rank}], "
                             f"got {skip}")
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def block(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's block of ``order`` in block order: a view (no copy) unless it wraps."""
        start = self.rank * self.per_rank
        mine = order[start:start + self.per_rank]
        if mine.numel() < self.per_rank:
            mine = torch.cat([mine, order[: self.per_rank - mine.numel()]])
        return mine

    def batch_starts(self) -> torch.Tensor:
        """Offset in the block of the batch the DataLoader receives k-th (all of this rank's
        batches, the partial one last)."""
        full = self.per_rank // self.batch_size
        k = torch.arange(full)
        counts = [(full - w + self.streams - 1) // self.streams for w in range(self.streams)]
        starts = torch.tensor([0] + counts[:-1]).cumsum(0)
        chunks = starts[k % self.streams] + k // self.streams
        if self.per_rank % self.batch_size:
            chunks = torch.cat([chunks, torch.tensor([full])])
        return chunks * self.batch_size

    def __iter__(self) -> Iterator[tuple]:
        order = shard_epoch_order(self.sample_shards, self.num_shards, self.epoch, self.seed, self.shuffle)
        block = self.block(order)
        first = self.rank * self.per_rank
        for start in self.batch_starts()[self.skip // self.batch_size:].tolist():
            stop = min(start + self.batch_size, self.per_rank)
            positions = torch.arange(first + start, first + stop)
            yield from iterate_pairs(positions, block[start:stop])
