"""Which videos each rank reads in an epoch, and the per-sample random streams.

Both pipelines use these, so that a CPU run and a DALI run with the same seed see the same videos
in the same order on every rank.
"""
import hashlib
from typing import Iterator, List, Optional

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
) -> List[int]:
    """The global order of video indices in one epoch (before sharding).

    Each video appears clips_per_video times (each read gets its own random clip). With
    samples_per_epoch (Table 3's "es"), the order is cut or cycled to that length, continuing
    through fresh permutations, so an epoch can be shorter or longer than the dataset.
    """
    if num_videos <= 0:
        raise ValueError("the dataset is empty: no videos to sample")
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
    per_pass = num_videos * clips_per_video
    total = samples_per_epoch if samples_per_epoch is not None else per_pass
    order: List[int] = []
    round_ = 0
    while len(order) < total:
        base = torch.arange(num_videos).repeat_interleave(clips_per_video)
        if shuffle:
            generator = torch.Generator()
            generator.manual_seed(sample_seed(seed, epoch, -1, round_))
            base = base[torch.randperm(per_pass, generator=generator)]
        order.extend(base.tolist())
        round_ += 1
    return order[:total]


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

    def __iter__(self) -> Iterator[tuple]:
        order = epoch_order(
            self.num_videos, self.epoch, self.seed, shuffle=self.shuffle,
            clips_per_video=self.clips_per_video, samples_per_epoch=self.samples_per_epoch,
        )
        padded = self.per_rank * self.world_size
        for position in range(self.rank + self.skip * self.world_size, padded, self.world_size):
            yield position, order[position % len(order)]
