"""Which videos each rank reads in an epoch, and the per-sample random streams.

Both pipelines use these, so that a CPU run and a DALI run with the same seed see the same videos
in the same order on every rank.
"""
import hashlib
from typing import Iterator, Optional

import torch


def sample_seed(seed: int, epoch: int, position: int, attempt: int = 0) -> int:
    """A 63-bit seed for one sample's augmentation, from (run seed, epoch, position in the epoch,
    replacement attempt): independent of worker count and of which rank reads it."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{position}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, epoch: int, position: int, attempt: int = 0) -> torch.Generator:
    """A CPU torch.Generator seeded with :func:`sample_seed`."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, epoch, position, attempt))
    return generator


def replacement_index(seed: int, epoch: int, position: int, attempt: int, num_videos: int) -> int:
    """The video read instead after ``attempt`` failures at this position (deterministic)."""
    return sample_seed(seed, epoch, position, 1_000_000 + attempt) % num_videos


def epoch_order(
    num_videos: int,
    epoch: int,
    seed: int,
    *,
    shuffle: bool = True,
    clips_per_video: int = 1,
    samples_per_epoch: Optional[int] = None,
) -> torch.Tensor:
    """The global order of video indices in one epoch (before sharding): an int64 tensor.

    Each video appears clips_per_video times (each read gets its own random clip). With
    samples_per_epoch (Table 3's "es"), the order is cut or cycled to that length, continuing
    through fresh permutations, so an epoch can be shorter or longer than the dataset.
    One tensor of 8 bytes per sample (16 MB for 2M videos); ranks read views of it.
    """
    if num_videos <= 0:
        raise ValueError("the dataset is empty: no videos to sample")
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
    per_pass = num_videos * clips_per_video
    total = samples_per_epoch if samples_per_epoch is not None else per_pass
    if total <= 0:
        raise ValueError(f"samples_per_epoch must be >= 1, got {total}")
    passes = []
    for round_ in range(-(-total // per_pass)):
        base = torch.arange(num_videos).repeat_interleave(clips_per_video)
        if shuffle:
            generator = torch.Generator()
            generator.manual_seed(sample_seed(seed, epoch, -1, round_))
            base = base[torch.randperm(per_pass, generator=generator)]
        passes.append(base)
    order = passes[0] if len(passes) == 1 else torch.cat(passes)
    return order[:total]


def iterate_pairs(positions: torch.Tensor, videos: torch.Tensor, chunk: int = 4096) -> Iterator[tuple]:
    """Yields (position, video) int pairs from two equally long 1-d tensors, converting ``chunk``
    elements at a time (never the whole sequence as Python ints)."""
    for start in range(0, positions.numel(), chunk):
        yield from zip(positions[start:start + chunk].tolist(), videos[start:start + chunk].tolist())


class ShardedEpochSampler(torch.utils.data.Sampler):
    """Yields (position, video index) pairs for one rank: positions rank, rank + world, ...

    The epoch order is padded by wrapping so every rank gets the same count (``len(self)``), as
    DistributedDataParallel needs. Call :meth:`set_epoch` before each epoch; its ``skip``
    resumes an epoch after this rank's first ``skip`` items.
    """

    def __init__(
        self,
        num_videos: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        clips_per_video: int = 1,
        samples_per_epoch: Optional[int] = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 = {world_size - 1}")
        self.num_videos, self.rank, self.world_size = num_videos, rank, world_size
        self.seed, self.shuffle, self.clips_per_video = seed, shuffle, clips_per_video
        self.samples_per_epoch = samples_per_epoch
        self.epoch, self.skip = 0, 0
        total = samples_per_epoch if samples_per_epoch is not None else num_videos * clips_per_video
        self.per_rank = -(-total // world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Selects the epoch; ``skip`` drops this rank's first items (resuming mid-epoch)."""
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"skip must be in [0, {self.per_rank}], got {skip}")
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def rank_order(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's videos in ``order`` (the epoch's global order), padding included: a strided
        view of ``order`` (no copy) when no padding is needed; the padded tail (fewer than
        world_size items wrapped from the start) is the only copy."""
        mine = order[self.rank::self.world_size]
        if mine.numel() < self.per_rank:  # padding: position p reads order[p % len(order)]
            wrapped = order[(self.rank + mine.numel() * self.world_size) % order.numel()].reshape(1)
            mine = torch.cat([mine, wrapped])
        return mine

    def __iter__(self) -> Iterator[tuple]:
        order = epoch_order(
            self.num_videos, self.epoch, self.seed, shuffle=self.shuffle,
            clips_per_video=self.clips_per_video, samples_per_epoch=self.samples_per_epoch,
        )
        videos = self.rank_order(order)[self.skip:]
        first = self.rank + self.skip * self.world_size
        positions = torch.arange(first, first + videos.numel() * self.world_size, self.world_size)
        yield from iterate_pairs(positions, videos)
