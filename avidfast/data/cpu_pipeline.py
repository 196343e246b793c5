"""The CPU pipeline: a Dataset of audio-visual clips and a loader that counts bad samples.

Every batch is a dict: ``video`` (B, 3, T, H, W) float32, ``audio`` (B, 1, F, T') float32
log-spectrogram (absent when the dataset reads video only: ``audio=False``), ``index`` (B,) int64
memory slot (the manifest row), ``label`` (B,) int64 when the manifest has labels, and in
evaluation mode ``clip`` (B,) int64 (clip number in its video).

Training mode: a file that fails to decode is logged with its path and reason and replaced by
another video chosen deterministically from (seed, epoch, position); the loader counts
replacements per epoch and stops with :class:`TooManyBadSamples` once they exceed
``max_bad_fraction`` of the epoch. Evaluation mode never replaces a video (each test video is
scored as itself or not at all): with ``on_bad="error"`` the loader stops with
:class:`BadTestVideo` naming the file; with ``on_bad="exclude"`` the video's clips are left out
of the batches and the video is listed in ``bad_files`` / ``bad_videos``.

With ``pad_short`` (the evaluation protocols) a video shorter than a clip is not rejected: its
frames are read from the start and repeated cyclically up to the clip's length, as the
reference implementation pads its evaluation clips.
"""
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from avidfast.data import audio as audio_ops
from avidfast.data import video as video_ops
from avidfast.data.audio import AudioJitter, SpectrogramPreset, SpectrogramStats
from avidfast.data.manifest import Manifest, ManifestError
from avidfast.data.probe import probe_header
from avidfast.data.sampling import ShardedEpochSampler, replacement_index, sample_generator
from avidfast.data.torchcodec_video import decode_frames_torchcodec, torchcodec_error
from avidfast.data.video import VideoConfig
from avidfast.errors import AvidfastError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 20  # replacements tried for one position before giving up
DECODERS = ("pyav", "torchcodec")
MediaSource = Union[str, BinaryIO]  # a file's path, or an open binary file (e.g. a shard member)


class TooManyBadSamples(AvidfastError, RuntimeError):
    """More samples failed in an epoch than ``max_bad_fraction`` allows."""


class SampleFailed(AvidfastError, RuntimeError):
    """Every replacement of one position failed too."""


class BadTestVideo(AvidfastError, RuntimeError):
    """A video of an evaluation set cannot be read (evaluation mode never replaces one)."""


BAD_TEST_POLICIES = ("error", "exclude")


@dataclass
class LoadedClip:
    """One decoded example before collation."""

    video: torch.Tensor  # (3, T, H, W) float32
    audio: Optional[torch.Tensor]  # (1, F, T') float32; None when the dataset reads video only
    index: int  # memory slot
    label: Optional[int] = None  # class index, when the data set is labelled


class ClipDataset(torch.utils.data.Dataset):
    """Audio-visual clips of a manifest, indexed by (epoch, position, video index) keys.

    mode ``train``: a random clip start, random resized crop / flip / colour jitter, jittered
    audio window; ``eval``: ``clips_per_video`` evenly spaced clips, resize + centre crop, audio
    at the clip start. Randomness comes from (seed, epoch, position) only, so results do not
    depend on the number of workers. ``label`` is the position of a row's label in ``classes``
    (default: the manifest's own sorted labels; a test set passes its training set's).

    ``audio=False``: video only (the evaluation protocols that use no sound): no audio is
    decoded or probed, items have no ``audio`` key and files without an audio stream are fine.
    ``pad_short``: a video shorter than a clip is read from its start and its frames repeated
    cyclically up to ``video.frames`` (module docstring) instead of failing.
    In evaluation mode a failing video is not replaced: its item has ``bad`` = True, zero
    tensors and its (path, reason) in ``failures``; :class:`CPULoader` decides what follows.
    ``decoder``: "pyav" (:func:`avidfast.data.video.decode_frames`) or "torchcodec"
    (:mod:`avidfast.data.torchcodec_video`; ValueError when it cannot load). torchcodec decodes
    small copies faster, but the loader as a whole was not reliably faster with it (BENCHMARKS.md), so
    PyAV is the default. A damaged file that PyAV's decoder conceals can fail with torchcodec
    (and is then replaced like any bad sample).
    """

    fatal_errors: Tuple[type, ...] = ()  # errors that stop the loader instead of replacing the sample

    def __init__(
        self,
        manifest: Manifest,
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
        audio: bool = True,
        pad_short: bool = False,
        decoder: str = "pyav",
    ):
        self._configure(video, audio_preset, stats, mode, jitter, clips_per_video, seed, decode_threads,
                        audio=audio, pad_short=pad_short, decoder=decoder)
        if audio:
            check_has_audio(manifest)
        self.manifest = manifest
        self.labels = manifest.label_indices(classes) if manifest.has_labels else None
        self._probed: Dict[int, Tuple[float, Optional[float]]] = {}

    def _configure(self, video: VideoConfig, audio_preset: Union[str, SpectrogramPreset],
                   stats: Optional[SpectrogramStats], mode: str, jitter: AudioJitter, clips_per_video: int,
                   seed: int, decode_threads: int, *, audio: bool = True, pad_short: bool = False,
                   decoder: str = "pyav") -> None:
        """The settings every clip data set shares (see the class docstring)."""
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got '{mode}'")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if decoder == "torchcodec" and torchcodec_error() is not None:
            raise ValueError(f"decoder='torchcodec': {torchcodec_error()}; use decoder='pyav'")
        self.decoder = decoder
        self.video, self.mode, self.jitter = video, mode, jitter
        self.read_audio, self.pad_short = audio, pad_short
        self.preset = audio_ops.get_preset(audio_preset) if isinstance(audio_preset, str) else audio_preset
        self.stats, self.clips_per_video, self.seed = stats, clips_per_video, seed
        self.decode_threads = decode_threads
        self.labels: Optional[List[int]] = None

    @property
    def num_videos(self) -> int:
        """Videos the keys' third element ranges over."""
        return len(self.manifest)

    def source_name(self, index: int) -> str:
        """What a bad-sample message names for video ``index``: its file."""
        return self.manifest.path(index)

    def epoch_sampler(self, *, rank: int, world_size: int, samples_per_epoch: Optional[int], batch_size: int,
                      workers: int) -> ShardedEpochSampler:
        """The training sampler of this data set (the batch size and workers do not change its order)."""
        return ShardedEpochSampler(self.num_videos, rank=rank, world_size=world_size, seed=self.seed,
                                   samples_per_epoch=samples_per_epoch)

    def __len__(self) -> int:
        return self.num_videos * (self.clips_per_video if self.mode == "eval" else 1)

    def __getitem__(self, key: Tuple[int, int, int]) -> Dict[str, torch.Tensor]:
        epoch, position, index = key
        if self.mode == "eval":
            return self._eval_item(position, index)
        failures: List[Tuple[str, str]] = []
        for attempt in range(MAX_ATTEMPTS):
            try:
                clip = self.load(index, epoch, position, attempt)
                break
            except self.fatal_errors:
                raise
            except Exception as error:  # noqa: BLE001 - any decoder failure is reported and replaced
                reason = f"{type(error).__name__}: {error}"
                name = self.source_name(index)
                log.debug("bad sample %s (video %d): %s; replacing it", name, index, reason)
                failures.append((name, reason))
                index = replacement_index(self.seed, epoch, position, attempt, self.num_videos)
        else:
            raise SampleFailed(f"{MAX_ATTEMPTS} videos in a row failed at position {position}; last: {failures[-1]}")
        item = {"video": clip.video, "index": torch.tensor(clip.index)}
        if clip.audio is not None:
            item["audio"] = clip.audio
        item["failures"] = "\n".join(f"{path}\t{reason}" for path, reason in failures)
        if clip.label is not None:
            item["label"] = torch.tensor(clip.label)
        return item

    def _eval_item(self, position: int, index: int) -> Dict[str, torch.Tensor]:
        """Clip ``position % clips_per_video`` of row ``index``, never another video: on failure an
        item with ``bad`` = True, zero tensors of the right shapes and the reason in ``failures``."""
        failure = ""
        try:
            clip = self.load(index, 0, position)
            video, audio = clip.video, clip.audio
        except self.fatal_errors:
            raise
        except Exception as error:  # noqa: BLE001 - reported by the loader with the file's path
            failure = f"{self.source_name(index)}\t{type(error).__name__}: {error}"
            log.debug("bad test video %s", failure)
            video = torch.zeros(3, self.video.frames, self.video.crop, self.video.crop)
            audio = torch.zeros(1, self.preset.bins, self.preset.frames) if self.read_audio else None
        item = {"video": video, "index": torch.tensor(index), "clip": torch.tensor(position % self.clips_per_video),
                "bad": torch.tensor(bool(failure)), "failures": failure}
        if audio is not None:
            item["audio"] = audio
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[index])
        return item

    def load(self, index: int, epoch: int, position: int, attempt: int = 0) -> LoadedClip:
        """Decodes and transforms row ``index`` (raises on any decode problem)."""
        path = self.manifest.path(index)
        duration, audio_duration = self.durations(index)
        size = frame_size(self.manifest.rows[index], path)
        audio_file = self.manifest.audio_path(index) if self.read_audio else None
        video, spec = self.transform(path, audio_file, duration, audio_duration, size, epoch, position, attempt)
        return LoadedClip(video, spec, index, self.labels[index] if self.labels is not None else None)

    def transform(self, video_file: MediaSource, audio_file: Optional[MediaSource], duration: float,
                  audio_duration: Optional[float], frame_size: Tuple[int, int], epoch: int, position: int,
                  attempt: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(video (3, T, H, W), spectrogram (1, F, T') or None reading video only) of one clip of
        ``video_file`` (a path or an open binary file) and its sound in ``audio_file``;
        ``duration`` / ``audio_duration`` in seconds, ``frame_size`` (height, width) of the stored
        video. Raises on any decode problem."""
        # a clip, and (reading audio) the shortest audio window
        needed = max(self.video.seconds, self.jitter.duration[0]) if self.read_audio else self.video.seconds
        decoded = self.video
        if duration < needed:
            if not (self.pad_short and not self.read_audio):
                raise ValueError(f"file is {duration:.2f} s, shorter than the {needed:.2f} s a clip needs")
            decoded = dataclasses.replace(self.video, frames=short_clip_frames(duration, self.video))
        height, width = frame_size
        if self.mode == "train":
            generator = sample_generator(self.seed, epoch, position, attempt)
            start = video_ops.train_start(duration, decoded, generator)
            aug = video_ops.draw_augment(height, width, self.video, generator)
            size = (self.video.crop, self.video.crop)
            frames = self.frame_decoder(video_file, start, decoded, crop=aug.crop, size=size,
                                        threads=self.decode_threads)
            video = video_ops.train_transform(frames, aug, self.video)
        else:
            start = video_ops.clip_starts(duration, decoded, self.clips_per_video)[position % self.clips_per_video]
            size = video_ops.eval_size(height, width, self.video.crop)
            frames = self.frame_decoder(video_file, start, decoded, size=size, threads=self.decode_threads)
            video = video_ops.eval_transform(frames, self.video)
        video = pad_frames_cyclically(video, self.video.frames)
        if not self.read_audio:
            return video, None
        if self.mode == "train":
            window = audio_ops.train_window(start, self.jitter, generator, audio_duration)
        else:
            window = audio_ops.eval_window(start, self.preset, audio_duration)
        wave = audio_ops.decode_audio(audio_file, window.start, window.duration, self.preset.sample_rate)
        spec = audio_ops.log_spectrogram(wave, self.preset, gain=window.gain, stats=self.stats)
        return video, spec.unsqueeze(0)

    @property
    def frame_decoder(self) -> Callable[..., np.ndarray]:
        """The frame decoder ``decoder`` names (both take decode_frames's arguments)."""
        return decode_frames_torchcodec if self.decoder == "torchcodec" else video_ops.decode_frames

    def durations(self, index: int) -> Tuple[float, Optional[float]]:
        """(video, audio) durations in seconds: from the manifest, else probed once per worker. Reading
        video only, the audio is not looked at (its duration is None)."""
        row = self.manifest.rows[index]
        if row.get("duration") and (row.get("audio_duration") or not self.read_audio):
            return float(row["duration"]), (float(row["audio_duration"]) if self.read_audio else None)
        if index not in self._probed:
            video = row.get("duration") or _stream_duration(self.manifest.path(index), "video")
            audio = _stream_duration(self.manifest.audio_path(index), "audio") if self.read_audio else None
            self._probed[index] = (video, audio)
        return self._probed[index]


def short_clip_frames(duration: float, config: VideoConfig) -> int:
    """Frames at ``config.fps`` a video of ``duration`` seconds holds (at least 1): what a padded clip
    reads before repeating them."""
    return max(1, min(config.frames, int(math.floor(duration * config.fps + 1e-6))))


def pad_frames_cyclically(video: torch.Tensor, frames: int) -> torch.Tensor:
    """(C, T, H, W) with T <= ``frames`` -> (C, frames, H, W): frame t is input frame t mod T (the
    reference's padding of short evaluation clips: the clip followed by its own start, repeated)."""
    have = video.shape[1]
    if have >= frames:
        return video
    return video[:, torch.arange(frames) % have]


def check_has_audio(manifest: Manifest) -> None:
    """ManifestError when rows of ``manifest`` are marked ``has_audio`` = 0 (``avidfast prepare
    --video-only`` writes that column): a reader of audio cannot use them."""
    if "has_audio" not in manifest.columns:
        return
    silent = [i for i, row in enumerate(manifest.rows) if str(row.get("has_audio")) in ("0", "False", "false")]
    if silent:
        raise ManifestError(f"{len(silent)} of {len(manifest)} rows have no audio stream (has_audio = 0, e.g. "
                            f"{manifest.path(silent[0])}); this reader needs audio: use these files only for "
                            "video-only evaluation, or prepare an audio-visual set without --video-only")


def _stream_duration(path: str, kind: str) -> float:
    """Duration in seconds of path's ``kind`` ('video' or 'audio') stream, by the rule of
    :mod:`avidfast.data.probe` (the stream's own, else the container's)."""
    header = probe_header(path, kind)
    duration = header.duration if kind == "video" else header.audio_duration
    if duration is None:
        raise ValueError("unknown duration; run `avidfast prepare` to record it")
    return duration


def frame_size(row: Dict[str, object], path: str) -> Tuple[int, int]:
    """(height, width) in pixels of a manifest row's video: from the row, else from the file's header."""
    if row.get("height") and row.get("width"):
        return int(row["height"]), int(row["width"])
    header = probe_header(path, "video")
    if not header.height or not header.width:
        raise ValueError("video has no frame size")
    return header.height, header.width


class _EpochKeys(torch.utils.data.Sampler):
    """Adds the epoch to a training sampler's (position, index) pairs (the sampler has ``epoch``)."""

    def __init__(self, sampler: torch.utils.data.Sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        for position, index in self.sampler:
            yield epoch, position, index


class _EvalKeys(torch.utils.data.Sampler):
    """Every clip of this rank's share of the videos, in order: (0, video * clips + c, video)."""

    def __init__(self, num_videos: int, clips: int, rank: int, world_size: int):
        self.keys = [(0, v * clips + c, v) for v in range(rank, num_videos, world_size) for c in range(clips)]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        return iter(self.keys)


class CPULoader:
    """Batches of a :class:`ClipDataset` from DataLoader workers, with bad-sample accounting.

    Iterating yields the batch contract (module docstring); ``bad_samples`` counts the
    replacements of the current epoch (each is logged with its path and reason) and
    ``bad_files`` lists their (path, reason).

    Evaluation mode: ``on_bad`` says what a video that cannot be read does (``error``: raise
    :class:`BadTestVideo` naming it; ``exclude``: its clips are dropped from the batches, the
    video's row goes to ``bad_videos`` and (path, reason) to ``bad_files``). ``max_bad_fraction``
    applies to training mode only.
    """

    def __init__(
        self,
        dataset: ClipDataset,
        *,
        batch_size: int,
        workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        samples_per_epoch: Optional[int] = None,
        drop_last: bool = True,
        max_bad_fraction: float = 0.01,
        timeout: float = 600.0,
        on_bad: str = "error",
    ):
        if on_bad not in BAD_TEST_POLICIES:
            raise ValueError(f"on_bad must be one of {BAD_TEST_POLICIES}, got '{on_bad}'")
        self.on_bad = on_bad
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.dataset, self.max_bad_fraction = dataset, max_bad_fraction
        if dataset.mode == "train":
            self.sampler = dataset.epoch_sampler(rank=rank, world_size=world_size, samples_per_epoch=samples_per_epoch,
                                                 batch_size=batch_size, workers=workers)
            keys = _EpochKeys(self.sampler)
        else:
            self.sampler = None
            keys = _EvalKeys(dataset.num_videos, dataset.clips_per_video, rank, world_size)
            drop_last = False
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=keys, num_workers=workers, drop_last=drop_last,
            timeout=timeout if workers > 0 else 0, persistent_workers=False,
        )
        self.bad_samples, self.seen = 0, 0
        self.bad_files: List[Tuple[str, str]] = []
        self.bad_videos: List[int] = []

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch's order and augmentation (training mode); ``skip_batches`` resumes
        the epoch after its first batches (their clips are not read)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, skip=skip_batches * self.loader.batch_size)
        elif skip_batches:
            raise ValueError("skip_batches needs a training-mode loader")

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if self.sampler is None:
            yield from self._eval_batches()
            return
        self.bad_samples, self.seen, self.bad_files = 0, 0, []
        allowed = self.max_bad_fraction * len(self.loader.sampler)
        try:
            for batch in self.loader:
                failures = [tuple(line.split("\t", 1)) for text in batch.pop("failures") for line in text.splitlines()]
                self.seen += batch["index"].numel()
                if failures:
                    for path, reason in failures:
                        log.warning("bad sample %s: %s; replaced by another video", path, reason)
                    self.bad_files.extend(failures)
                    self.bad_samples += len(failures)
                    if self.bad_samples > allowed:
                        raise TooManyBadSamples(
                            f"{self.bad_samples} bad samples after {self.seen} of {len(self.loader.sampler)} this "
                            f"epoch, more than max_bad_fraction={self.max_bad_fraction}; see the warnings above for "
                            "each file and reason, fix or drop them (avidfast prepare writes rejected.csv), or raise "
                            "max_bad_fraction"
                        )
                yield batch
        except AvidfastError as error:  # SampleFailed, or a data set's fatal error, raised in a worker
            raise type(error)(_worker_message(str(error), type(error))) from None


    def _eval_batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Evaluation batches without the clips of unreadable videos (or BadTestVideo, ``on_bad="error"``)."""
        self.bad_samples, self.seen, self.bad_files, self.bad_videos = 0, 0, [], []
        bad_videos = set()
        for batch in self.loader:
            failures = batch.pop("failures")
            bad = batch.pop("bad")
            self.seen += batch["index"].numel()
            for row in bad.nonzero().flatten().tolist():
                path, reason = failures[row].split("\t", 1)
                if self.on_bad == "error":
                    raise BadTestVideo(f"test video {path} cannot be read ({reason}); fix or remove it from the "
                                       "test manifest, or leave it out of the score (listed in results.json) with "
                                       "--set data.on_bad_test_video=exclude")
                video = int(batch["index"][row])
                if video not in bad_videos:
                    bad_videos.add(video)
                    self.bad_videos.append(video)
                    self.bad_files.append((path, reason))
                    log.warning("test video %s cannot be read (%s); excluded from the score", path, reason)
                self.bad_samples += 1
            keep = torch.tensor([int(i) not in bad_videos for i in batch["index"]], dtype=torch.bool)
            if not bool(keep.all()):
                batch = {k: v[keep] for k, v in batch.items()}
            if batch["index"].numel():
                yield batch


def _worker_message(text: str, kind: type) -> str:
    """The message of a ``kind`` error a DataLoader worker raised: DataLoader re-raises it with the
    worker's traceback in front (ending ``module.Kind: message``); in-process errors pass unchanged."""
    marker = f"{kind.__name__}: "
    at = text.rfind(marker)
    if "Original Traceback" not in text or at < 0:
        return text
    return text[at + len(marker):].strip()
