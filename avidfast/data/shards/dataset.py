"""The CPU pipeline's data set over a shard folder: :class:`ShardClipDataset`.

Keys are (epoch, position, sample number in the index) like :class:`~avidfast.data.cpu_pipeline.ClipDataset`'s,
the batches are the same contract, and the training order comes from
:class:`~avidfast.data.shards.order.ShardGroupedSampler`. Each sample is read with one positioned
read per member from a shard file the worker keeps open; the memory slot (``index``), the label
and the durations and frame size come from the sample's JSON member. A member that cannot be read
or decoded (truncated shard, corrupt bytes, bad JSON) makes the sample bad: it is named
(``shard.tar:key.ext``), replaced and counted exactly as a bad file is. A missing shard stops
the loader with :class:`~avidfast.data.shards.index.ShardError` naming it.
"""
from typing import Optional, Sequence, Union

from avidfast.data.audio import AudioJitter, SpectrogramPreset, SpectrogramStats
from avidfast.data.cpu_pipeline import ClipDataset, LoadedClip
from avidfast.data.shards.index import ShardError, ShardIndex, read_index
from avidfast.data.shards.order import ShardGroupedSampler
from avidfast.data.shards.reader import SampleReader
from avidfast.data.video import VideoConfig


class ShardClipDataset(ClipDataset):
    """Audio-visual clips of a shard folder (``shards``: the folder, its ``index.npz``, or a read
    :class:`ShardIndex`); the other arguments as for ClipDataset. ``label`` is the position of a
    sample's label in ``classes`` (default: the classes the index lists, those of the manifest the
    shards were written from)."""

    fatal_errors = (ShardError,)  # a missing shard stops the loader; a bad member is a bad sample

    def __init__(
        self,
        shards: Union[str, ShardIndex],
        *,
        video: VideoConfig = VideoConfig(),
        audio_preset: Union[str, SpectrogramPreset] = "table5",
        stats: Optional[SpectrogramStats] = None,
        mode: str = "train",
        jitter: AudioJitter = AudioJitter(),
        clips_per_video: int = 1,
        seed: int = 0,
        decode_threads: int = 1,
        classes: Optional[Sequence[str]] = None,
    ):
        self._configure(video, audio_preset, stats, mode, jitter, clips_per_video, seed, decode_threads)
        self.index = shards if isinstance(shards, ShardIndex) else read_index(shards)
        self.index.check_shards()
        self.reader = SampleReader(self.index)
        classes = list(classes) if classes is not None else self.index.classes
        self.class_of = {str(name): i for i, name in enumerate(classes)}

    @property
    def num_videos(self) -> int:
        return len(self.index)

    def source_name(self, index: int) -> str:
        return self.reader.name(index)

    def epoch_sampler(self, *, rank: int, world_size: int, samples_per_epoch: Optional[int], batch_size: int,
                      workers: int) -> ShardGroupedSampler:
        """Shard-grouped training order: each rank and loader worker reads its own shards."""
        if samples_per_epoch is not None:
            raise ValueError("samples_per_epoch is not supported on shards: an epoch over shards reads every "
                             "sample once; leave it unset")
        return ShardGroupedSampler(self.index.shard, rank=rank, world_size=world_size,
                                   seed=self.seed, batch_size=batch_size, workers=workers)

    def load(self, index: int, epoch: int, position: int, attempt: int = 0) -> LoadedClip:
        """Reads and transforms sample ``index`` (its number in the index); raises on any problem
        with its members, except a missing shard (ShardError, which stops the loader)."""
        meta = self.reader.metadata(index)
        label = None
        if self.class_of:
            name = meta.get("label")
            if name is None or str(name) not in self.class_of:
                raise ValueError(f"{self.reader.name(index, 'json')}: label {name!r} is not among the "
                                 f"{len(self.class_of)} classes")
            label = self.class_of[str(name)]
        try:
            duration = float(meta["duration"])
            audio_duration = float(meta.get("audio_duration") or duration)
            size = int(meta["height"]), int(meta["width"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{self.reader.name(index, 'json')}: metadata incomplete ({error})") from None
        video = self.reader.member_file(index, self.reader.video_ext(index))
        audio_ext = self.reader.audio_ext(index)
        audio = self.reader.member_file(index, audio_ext) if audio_ext else self.reader.member_file(
            index, self.reader.video_ext(index))
        clip, spec = self.transform(video, audio, duration, audio_duration, size, epoch, position, attempt)
        return LoadedClip(clip, spec, int(meta["index"]), label)
