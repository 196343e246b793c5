"""DALI data pipeline: the same batches as the CPU pipeline, decoded and augmented by NVIDIA DALI.

Batch contract (both pipelines; docs/architecture.md), for a loader built with batch size B:

* ``video``: (B, 3, T, H, W) float32, pixel values in [0, 1] normalised with VideoConfig.mean/std
  (T = VideoConfig.frames, H = W = VideoConfig.crop);
* ``audio``: (B, 1, F, T') float32 log-power spectrogram (F = preset.bins, T' = preset.frames),
  Z-normalised per bin when SpectrogramStats are given, plain dB otherwise;
* ``index``: (B,) int64, the manifest row (memory slot) actually read;
* ``label``: (B,) int64 class index, only when the manifest has labels.

On a GPU (``device_id`` set) ``video`` and ``audio`` are CUDA tensors on that device and ``index``
/ ``label`` stay on the CPU; with ``device_id=None`` everything runs and stays on the CPU.

How it works. One per-batch ``fn.external_source`` callback walks this rank's
:class:`~avidfast.data.sampling.ShardedEpochSampler` order and, for every (position, video index),
reads the encoded video file and the extracted audio file (``Manifest.audio_path``) as bytes and
draws the sample's random parameters from ``sample_generator(seed, epoch, position, attempt)``:
clip start, the frame indices at VideoConfig.fps, crop / flip / colour factors and the audio window
(:func:`avidfast.data.audio.train_window` / ``eval_window``). Pairing, sharding and the random
streams are therefore decided in Python exactly as for the CPU pipeline, and the DALI graph only
executes them:

* video: ``fn.decoders.video`` (cpu backend on CPU, ``mixed`` = NVDEC on GPU) with the per-sample
  ``frames`` list (decodes only from the keyframe before the clip; frames past the end repeat the
  last frame); train: ``fn.resize`` of the drawn crop (relative ROI, the same for every frame) to
  crop x crop, ``fn.color_twist``, ``fn.crop_mirror_normalize`` (flip, normalise, FHWC -> CFHW);
  eval: short side to crop / 0.875, centre crop.
  One code path serves CPU and GPU (only the decoder's backend differs). ``fn.readers.video`` was
  not used: it is GPU-only, does its own shuffling/sharding (so the order and the audio pairing
  would have to be recovered from its frame numbers) and cannot be exercised on a CPU.
* audio: ``fn.decoders.audio`` (CPU; WAV/FLAC/OGG, resampled to 24 kHz, downmixed) -> window slice
  (zero-padded past the end) -> x gain -> [.gpu()] -> ``fn.spectrogram`` (periodic Hann window of
  n_fft, centred frames, reflect padding, power 2) -> keep ``frames_for(samples)`` frames ->
  ``fn.to_decibels`` (cutoff -100 dB = 10 log10(AMIN), reference 1) -> linear resize of the time
  axis to preset.frames (half-pixel centres, no antialiasing: F.interpolate(linear,
  align_corners=False)) -> (x - mean) / (std + NORM_EPS). This reproduces
  :func:`avidfast.data.audio.log_spectrogram` to about 1e-3 dB (float32 FFT rounding).

Differences from the CPU (torch) pipeline, by construction of DALI's operators:

* colour jitter is DALI's fused ``color_twist`` (one affine colour transform in YIQ space: hue
  rotation, saturation, brightness, contrast around mid-grey) applied in a fixed order, not
  torchvision-style sequential ops in the random ``ClipAugment.order`` with contrast around the
  image mean;
* resizing uses DALI's linear filter with antialiasing on uint8 frames.

Shards. Given a :class:`~avidfast.data.shards.index.ShardIndex` instead of a manifest, the same
callback reads each sample's video and audio members from the tar shards by their offsets (one
positioned read each, the shard files kept open) and takes the memory slot and label from the
sample's JSON member; the order is :class:`~avidfast.data.shards.order.ShardGroupedSampler`'s, so
each rank reads its own shards and a resume is exact. ``fn.readers.webdataset`` reads the same
shards (they follow its layout) but was not used for training for the reason ``fn.readers.video``
was not: it shuffles and shards by itself, so neither the per-position random streams nor an exact
mid-epoch resume could be kept.

Bad input. DALI cannot skip a sample that fails inside the graph, so the callback checks every
file before handing it over (exists, non-empty; with ``validate='probe'``, the default on CPU,
also that PyAV can open it and that its codec is one the backend decodes) and replaces a bad one
by ``sampling.replacement_index`` (logged with path and reason, counted in ``bad_files``; the
run stops when more than ``max_bad_fraction`` of the dataset is bad). What DALI 2.4 does when a file
passes these checks but is damaged: a stream truncated or corrupted mid-way decodes without an
error (FFmpeg logs e.g. "File ended prematurely"; missing frames repeat the last decoded one); a
container that cannot be opened at all fails an assertion in the decoder that invalidates the
whole pipeline ("Current pipeline object is no longer valid"), and the loader raises RuntimeError
naming the files of the batches in flight. Run ``avidfast prepare`` (which rejects undecodable
files) or ``validate='probe'`` to keep such files out.

Codecs. DALI's CPU video decoder handles VP8, VP9 and MJPEG only; the mixed (GPU) one adds
H.264, HEVC, AV1 and MPEG-4. ``fn.decoders.audio`` reads WAV/FLAC/OGG only, so AAC audio in MP4
must be extracted first (``avidfast prepare --extract-audio wav``).

For a throughput benchmark of the Table 6 setting on a GPU from H.264 files::

    loader = build_dali_loader(manifest, video=VideoConfig(frames=8, crop=224), audio_preset="table6",
                               stats=None, batch_size=32, device_id=0, num_threads=8)
    for batch in loader: ...
"""
import logging
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from avidfast.data.audio import (
    AMIN, NORM_EPS, AudioJitter, SpectrogramPreset, SpectrogramStats, dali_can_compute, eval_window, frames_for,
    get_preset, hann_window, train_window, window_samples,
)
from avidfast.data.manifest import Manifest, read_manifest
from avidfast.data.probe import probe_header
from avidfast.data.sampling import ShardedEpochSampler, replacement_index, sample_generator
from avidfast.data.shards.index import AUDIO_MEMBER_EXTENSIONS, ShardError, ShardIndex
from avidfast.data.shards.order import ShardGroupedSampler
from avidfast.data.shards.reader import SampleReader
from avidfast.data.video import (
    ClipAugment, VideoConfig, clip_starts, draw_augment, eval_short_side, train_start,
)
from avidfast.errors import AvidfastError

log = logging.getLogger(__name__)

CPU_VIDEO_CODECS = ("vp8", "vp9", "mjpeg")
GPU_VIDEO_CODECS = ("vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus")
MAX_ATTEMPTS = 10  # replacements tried at one position before giving up
_PREPARE_HINT = "run `avidfast prepare --transcode vp9 --extract-audio wav` on the manifest"


class DaliInputError(AvidfastError, ValueError):
    """Input the DALI pipeline cannot read as configured (names the file and what to do)."""


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        require_dali()
    except ImportError:
        return False
    return True


def require_dali():
    """Imports and returns ``nvidia.dali``; raises ImportError saying how to install it."""
    try:
        import nvidia.dali as dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"the DALI pipeline needs NVIDIA DALI ({error}); install it with "
            "`pip install avidfast[dali]` (nvidia-dali-cuda130; pick the -cudaXXX wheel matching your CUDA), "
            "or use the CPU pipeline"
        ) from None
    return dali


# --------------------------------------------------------------------------------------------
# What one sample is: the parameters the callback draws and hands to the graph
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaInfo:
    """What the pipeline needs to know about a video file."""

    codec: Optional[str]
    width: int
    height: int
    fps: float
    duration: float


def probe_media(path: str) -> MediaInfo:
    """Codec, frame size, frame rate and duration of path's video stream, from
    :func:`avidfast.data.probe.probe_header` (so the duration follows that module's rule: the
    video stream's own, else the container's; 0 where unknown).

    Raises ValueError when the file cannot be opened or has no video stream."""
    header = probe_header(path, "video")
    return MediaInfo(header.video_codec, header.width or 0, header.height or 0, header.fps or 0.0,
                     header.duration or 0.0)


def frame_indices(start: float, config: VideoConfig, file_fps: float) -> np.ndarray:
    """Indices of the T frames sampled at config.fps from ``start`` seconds in a file at file_fps."""
    first = int(math.floor(start * file_fps + 1e-6))
    step = file_fps / config.fps
    return np.array([first + int(math.floor(k * step + 1e-6)) for k in range(config.frames)], dtype=np.int32)


@dataclass(frozen=True)
class SamplePlan:
    """Everything the graph needs for one sample (also handy to check the pipeline against)."""

    position: int  # position in the epoch order
    index: int  # manifest row actually read (after replacements)
    attempt: int  # 0, or the number of bad files replaced at this position
    video_path: str
    audio_path: str
    frames: Tuple[int, ...]  # frame indices in the file
    video_start: float  # seconds, time of the first sampled frame
    augment: Optional[ClipAugment]  # None in evaluation mode
    roi: Tuple[float, float, float, float]  # crop as (top, left, bottom, right), relative to frame size
    audio_start: int  # first sample of the audio window (24 kHz)
    audio_samples: int  # samples in the window
    gain: float


# --------------------------------------------------------------------------------------------
# The external source
# --------------------------------------------------------------------------------------------


class _Source:
    """Per-batch callback of ``fn.external_source``: batch ``iteration`` of the current epoch."""

    def __init__(self, manifest: Manifest, sampler: ShardedEpochSampler, *, video: VideoConfig,
                 preset: SpectrogramPreset, jitter: AudioJitter, train: bool, seed: int, batch_size: int,
                 drop_last: bool, gpu: bool, validate: str, max_bad_fraction: float, labels: Optional[List[int]],
                 read_threads: int):
        self.manifest, self.sampler, self.video, self.preset = manifest, sampler, video, preset
        self.jitter, self.train, self.seed, self.batch_size = jitter, train, seed, batch_size
        self.gpu, self.validate, self.max_bad_fraction, self.labels = gpu, validate, max_bad_fraction, labels
        per_rank = len(sampler)
        self.drop_last = drop_last
        self.limit = (per_rank // batch_size) * batch_size if drop_last else per_rank
        self.outputs = _source_outputs(train, labels is not None)
        self.epoch = 0
        self.order: List[Tuple[int, int]] = []
        self.abort = False
        self.bad_files: Dict[str, str] = {}  # path -> reason, distinct files
        self.bad_reads = 0  # replacements made (a bad file read twice counts twice)
        self.recent: deque = deque(maxlen=8)  # file paths of the last batches handed to DALI (> prefetch depth)
        self._info: Dict[int, MediaInfo] = {}
        self._bad_rows: Dict[int, Tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, read_threads), thread_name_prefix="avidfast-dali-read")

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = list(self.sampler)
        per_rank = len(self.order)
        self.limit = (per_rank // self.batch_size) * self.batch_size if self.drop_last else per_rank
        self.abort = False

    # -- per-file checks ---------------------------------------------------------------------

    def _media(self, row: int) -> MediaInfo:
        """Manifest metadata, completed (and on probe, the codec checked) with PyAV; cached."""
        info = self._info.get(row)
        if info is not None:
            return info
        meta = self._metadata(row)
        missing = [k for k in (("duration", "fps", "width", "height") if self.train else ("duration", "fps"))
                   if meta.get(k) in (None, 0)]
        probed = None
        if self.validate == "probe" or missing:
            probed = self._probe(row)  # ValueError -> bad file
            allowed = GPU_VIDEO_CODECS if self.gpu else CPU_VIDEO_CODECS
            if self.validate == "probe" and probed.codec not in allowed:
                where = "DALI's GPU video decoder" if self.gpu else "DALI's CPU video decoder"
                fix = _PREPARE_HINT if self.gpu else f"{_PREPARE_HINT}, or pass device_id=<gpu> to decode it with NVDEC"
                raise DaliInputError(
                    f"{self._video_name(row)}: video codec '{probed.codec}' cannot be decoded by {where} "
                    f"(supported: {', '.join(allowed)}); {fix}"
                )

        def pick(key, fallback):
            value = meta.get(key)
            return value if value not in (None, 0) else fallback
        info = MediaInfo(
            probed.codec if probed else None,
            int(pick("width", probed.width if probed else 0)),
            int(pick("height", probed.height if probed else 0)),
            float(pick("fps", probed.fps if probed and probed.fps else self.video.fps)),
            float(pick("duration", probed.duration if probed else 0.0)),
        )
        self._info[row] = info
        return info

    # -- where the media come from: the manifest's files (a shard source reads shard members) ---

    fatal_errors: Tuple[type, ...] = (DaliInputError,)  # errors that stop the loader, never replaced

    @property
    def count(self) -> int:
        """Videos the order's indices range over."""
        return len(self.manifest)

    def _metadata(self, row: int) -> Dict[str, object]:
        return self.manifest.rows[row]

    def _video_name(self, row: int) -> str:
        return self.manifest.path(row)

    def _audio_name(self, row: int) -> str:
        return self.manifest.audio_path(row)

    def _probe(self, row: int) -> MediaInfo:
        return probe_media(self.manifest.path(row))

    def _probe_audio(self, row: int) -> None:
        probe_header(self.manifest.audio_path(row), "audio")

    def _check_files(self, row: int) -> Optional[Tuple[str, str]]:
        """(path, reason) when a file of row is missing, unreadable or empty."""
        for path in (self.manifest.path(row), self.manifest.audio_path(row)):
            try:
                size = os.stat(path).st_size
            except OSError as error:
                return path, f"cannot read ({error.strerror or error})"
            if size == 0:
                return path, "empty file"
        return None

    def _read(self, row: int) -> Tuple[np.ndarray, np.ndarray]:
        """The encoded video and audio of row, as uint8 arrays."""
        return (np.fromfile(self.manifest.path(row), dtype=np.uint8),
                np.fromfile(self.manifest.audio_path(row), dtype=np.uint8))

    def _slot_label(self, row: int) -> Tuple[int, Optional[int]]:
        """The memory slot and class index of row."""
        return row, (self.labels[row] if self.labels is not None else None)

    def _check(self, row: int) -> Optional[Tuple[str, str]]:
        """(path, reason) when row's files cannot be used, else None."""
        if row in self._bad_rows:
            return self._bad_rows[row]
        bad = self._check_files(row)
        if bad is None:
            try:
                info = self._media(row)
                if self.train and (info.width <= 0 or info.height <= 0):
                    raise ValueError("no frame size in the manifest or the file")
            except self.fatal_errors:
                raise
            except ValueError as error:
                bad = (self._video_name(row), str(error))
        if bad is None and self.validate == "probe":
            try:
                self._probe_audio(row)
            except self.fatal_errors:
                raise
            except ValueError as error:
                bad = (self._audio_name(row), str(error))
        if bad is not None:
            self._bad_rows[row] = bad
        return bad

    def _report(self, bad: Tuple[str, str], position: int) -> None:
        path, reason = bad
        with self._lock:
            self.bad_reads += 1
            new = path not in self.bad_files
            self.bad_files[path] = reason
            too_many = len(self.bad_files) > self.max_bad_fraction * self.count
        if new:
            log.warning("DALI input %s: %s; replaced deterministically (position %d, epoch %d)",
                        path, reason, position, self.epoch)
        if too_many:
            listed = "; ".join(f"{p}: {r}" for p, r in list(self.bad_files.items())[:5])
            raise RuntimeError(
                f"{len(self.bad_files)} of {self.count} input files are unusable, more than "
                f"max_bad_fraction = {self.max_bad_fraction:g} of the dataset ({listed}...); fix the manifest "
                "(`avidfast prepare` writes a clean one) or raise max_bad_fraction"
            )

    # -- one sample --------------------------------------------------------------------------

    def plan(self, position: int, row: int, attempt: int = 0, epoch: Optional[int] = None) -> SamplePlan:
        """The sample read at ``position`` from manifest row ``row`` (no file checks)."""
        info = self._media(row)
        epoch = self.epoch if epoch is None else epoch
        generator = sample_generator(self.seed, epoch, position, attempt)
        video, preset = self.video, self.preset
        if self.train:
            start = train_start(info.duration, video, generator)
        else:
            start = clip_starts(info.duration, video, 1)[0]
        file_fps = info.fps if info.fps > 0 else video.fps
        frames = frame_indices(start, video, file_fps)
        video_start = frames[0] / file_fps
        duration = info.duration if info.duration > 0 else None
        if self.train:
            augment = draw_augment(info.height, info.width, video, generator)
            top, left, h, w = augment.crop
            roi = (top / info.height, left / info.width, (top + h) / info.height, (left + w) / info.width)
            window = train_window(video_start, self.jitter, generator, duration)
        else:
            augment, roi = None, (0.0, 0.0, 1.0, 1.0)
            window = eval_window(video_start, preset, duration)
        first, samples = window_samples(window, preset.sample_rate)
        if samples <= preset.n_fft // 2:
            raise ValueError(f"audio window of {samples} samples is too short for n_fft {preset.n_fft}")
        return SamplePlan(position, row, attempt, self._video_name(row), self._audio_name(row),
                          tuple(int(f) for f in frames), float(video_start), augment, roi, first, samples,
                          float(window.gain))

    def _load(self, item: Tuple[int, int]):
        position, row = item
        for attempt in range(MAX_ATTEMPTS + 1):
            if attempt:
                row = replacement_index(self.seed, self.epoch, position, attempt, self.count)
            bad = self._check(row)
            if bad is None:
                try:
                    video_bytes, audio_bytes = self._read(row)
                    slot, label = self._slot_label(row)
                except self.fatal_errors:
                    raise
                except (OSError, ValueError) as error:
                    bad = (self._video_name(row), f"cannot read ({error})")
            if bad is None:
                return self.plan(position, row, attempt), video_bytes, audio_bytes, slot, label
            self._report(bad, position)
        raise RuntimeError(
            f"position {position} of epoch {self.epoch}: {MAX_ATTEMPTS + 1} files in a row were unusable "
            f"(last: {bad[0]}: {bad[1]}); the manifest needs cleaning (`avidfast prepare`)"
        )

    def __call__(self, iteration: int):
        lo = iteration * self.batch_size
        if self.abort or lo >= self.limit:
            raise StopIteration
        items = self.order[lo: min(lo + self.batch_size, self.limit)]
        loaded = list(self._pool.map(self._load, items))
        self.recent.append([path for plan, *_ in loaded for path in (plan.video_path, plan.audio_path)])
        f32, i32, i64 = np.float32, np.int32, np.int64
        out = {k: [] for k in self.outputs}
        for plan, video_bytes, audio_bytes, slot, label in loaded:
            out["video"].append(video_bytes)
            out["audio"].append(audio_bytes)
            out["frames"].append(np.asarray(plan.frames, dtype=i32))
            out["index"].append(np.array(slot, dtype=i64))
            out["audio_start"].append(np.array([plan.audio_start], dtype=i32))
            out["audio_len"].append(np.array([plan.audio_samples], dtype=i32))
            out["keep"].append(np.array([frames_for(plan.audio_samples, self.preset)], dtype=i32))
            if "label" in out:
                out["label"].append(np.array(label, dtype=i64))
            if self.train:
                aug = plan.augment
                out["roi_start"].append(np.array(plan.roi[:2], dtype=f32))
                out["roi_end"].append(np.array(plan.roi[2:], dtype=f32))
                out["flip"].append(np.array(int(aug.flip), dtype=i32))
                out["brightness"].append(np.array(aug.brightness, dtype=f32))
                out["contrast"].append(np.array(aug.contrast, dtype=f32))
                out["saturation"].append(np.array(aug.saturation, dtype=f32))
                out["hue"].append(np.array(aug.hue * 360.0, dtype=f32))  # turns -> degrees
                out["gain"].append(np.array(plan.gain, dtype=f32))
        return tuple(out[name] for name in self.outputs)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class _ShardSource(_Source):
    """The external source over a shard folder: the members of each sample (video, extracted
    audio) are read from the shards by index; memory slot, label and metadata come from the
    sample's JSON member. A member that cannot be read is a bad sample (named
    ``shard.tar:key.ext``); a missing shard stops the loader (ShardError)."""

    fatal_errors = (DaliInputError, ShardError)

    def __init__(self, index: ShardIndex, sampler, **kwargs):
        super().__init__(None, sampler, labels=None, **kwargs)
        self.reader = SampleReader(index)
        self.class_of = {name: i for i, name in enumerate(index.classes)}
        self.outputs = _source_outputs(self.train, bool(self.class_of))

    @property
    def count(self) -> int:
        return len(self.reader.index)

    def _metadata(self, row: int) -> Dict[str, object]:
        return self.reader.metadata(row)

    def _video_name(self, row: int) -> str:
        return self.reader.name(row, self.reader.video_ext(row))

    def _audio_name(self, row: int) -> str:
        return self.reader.name(row, self.reader.audio_ext(row))

    def _probe(self, row: int) -> MediaInfo:
        import av

        try:
            with av.open(self.reader.member_file(row, self.reader.video_ext(row))) as container:
                stream = container.streams.video[0] if container.streams.video else None
                if stream is None:
                    raise ValueError("no video stream")
                context = stream.codec_context
                duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
                return MediaInfo(context.name, context.width or 0, context.height or 0,
                                 float(stream.average_rate or 0), duration)
        except av.FFmpegError as error:
            raise ValueError(f"{self._video_name(row)}: {error}") from None

    def _probe_audio(self, row: int) -> None:
        import av

        try:
            with av.open(self.reader.member_file(row, self.reader.audio_ext(row))) as container:
                if not container.streams.audio:
                    raise ValueError("no audio stream")
        except av.FFmpegError as error:
            raise ValueError(f"{self._audio_name(row)}: {error}") from None

    def _check_files(self, row: int) -> Optional[Tuple[str, str]]:
        return None  # a member that cannot be read fails in _read, a missing shard raises ShardError

    def _read(self, row: int) -> Tuple[np.ndarray, np.ndarray]:
        video = self.reader.read(row, self.reader.video_ext(row))
        audio = self.reader.read(row, self.reader.audio_ext(row))
        return np.frombuffer(video, dtype=np.uint8), np.frombuffer(audio, dtype=np.uint8)

    def _slot_label(self, row: int) -> Tuple[int, Optional[int]]:
        meta = self.reader.metadata(row)
        if not self.class_of:
            return int(meta["index"]), None
        if str(meta.get("label")) not in self.class_of:
            raise ValueError(f"label {meta.get('label')!r} is not among the {len(self.class_of)} classes")
        return int(meta["index"]), self.class_of[str(meta["label"])]


def _source_outputs(train: bool, with_label: bool) -> Tuple[str, ...]:
    """Names of the callback's outputs, in order (only those the graph uses)."""
    names = ("video", "audio", "frames", "index", "audio_start", "audio_len", "keep")
    if with_label:
        names += ("label",)
    if train:
        names += ("roi_start", "roi_end", "flip", "brightness", "contrast", "saturation", "hue", "gain")
    return names


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------


def _build_pipeline(source: _Source, *, video: VideoConfig, preset: SpectrogramPreset,
                    stats: Optional[SpectrogramStats], train: bool, with_label: bool, batch_size: int,
                    num_threads: int, device_id: Optional[int], seed: int, prefetch_queue_depth: int):
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=seed % (2 ** 31), prefetch_queue_depth=prefetch_queue_depth)
    dtypes = {"video": types.UINT8, "audio": types.UINT8, "frames": types.INT32, "index": types.INT64,
              "label": types.INT64, "roi_start": types.FLOAT, "roi_end": types.FLOAT, "flip": types.INT32,
              "brightness": types.FLOAT, "contrast": types.FLOAT, "saturation": types.FLOAT, "hue": types.FLOAT,
              "audio_start": types.INT32, "audio_len": types.INT32, "gain": types.FLOAT, "keep": types.INT32}
    ndims = {"video": 1, "audio": 1, "frames": 1, "roi_start": 1, "roi_end": 1, "audio_start": 1,
             "audio_len": 1, "keep": 1}
    with pipe:
        names = source.outputs
        nodes = fn.external_source(source=source, num_outputs=len(names), batch=True,
                                   dtype=[dtypes[k] for k in names], ndim=[ndims.get(k, 0) for k in names])
        x = dict(zip(names, nodes))

        # video: decode the T frames, then crop/flip/colour/normalise with the same values for all frames
        frames = fn.decoders.video(x["video"], device="mixed" if gpu else "cpu", frames=x["frames"],
                                   pad_mode="edge")
        mean = [255.0 * m for m in video.mean]
        std = [255.0 * s for s in video.std]
        if train:
            frames = fn.resize(frames, roi_start=x["roi_start"], roi_end=x["roi_end"], roi_relative=True,
                               size=[video.crop, video.crop], interp_type=types.INTERP_LINEAR, antialias=True)
            frames = fn.color_twist(frames, brightness=x["brightness"], contrast=x["contrast"],
                                    saturation=x["saturation"], hue=x["hue"])
            clips = fn.crop_mirror_normalize(frames, mirror=x["flip"], mean=mean, std=std,
                                             output_layout="CFHW", dtype=types.FLOAT)
        else:
            frames = fn.resize(frames, resize_shorter=eval_short_side(video.crop), interp_type=types.INTERP_LINEAR,
                               antialias=True)
            clips = fn.crop_mirror_normalize(frames, crop=[video.crop, video.crop], mean=mean, std=std,
                                             output_layout="CFHW", dtype=types.FLOAT)

        # audio: decode (CPU), window, gain, then spectrogram -> dB -> resize -> normalise
        wave, _ = fn.decoders.audio(x["audio"], sample_rate=float(preset.sample_rate), downmix=True,
                                    dtype=types.FLOAT)
        wave = fn.slice(wave, x["audio_start"], x["audio_len"], axes=[0], out_of_bounds_policy="pad")
        if train:
            wave = wave * x["gain"]
        if gpu:
            wave = wave.gpu()
        spec = fn.spectrogram(wave, nfft=preset.n_fft, window_length=preset.n_fft, window_step=preset.hop_length,
                              window_fn=hann_window(preset).tolist(), center_windows=True, reflect_padding=True,
                              power=2, layout="ft")
        spec = fn.slice(spec, start=[0], shape=x["keep"], axes=[1])  # drop the frame centred past the window
        spec = fn.to_decibels(spec, multiplier=10.0, reference=1.0, cutoff_db=10.0 * math.log10(AMIN))
        spec = fn.reshape(fn.expand_dims(spec, axes=[2]), layout="HWC")  # (F, t, 1) for fn.resize
        spec = fn.resize(spec, size=[preset.bins, preset.frames], interp_type=types.INTERP_LINEAR,
                         antialias=False, dtype=types.FLOAT)
        spec = fn.reshape(spec, shape=[1, preset.bins, preset.frames], layout="CHW")
        if stats is not None:
            device = "gpu" if gpu else "cpu"
            spec_mean = stats.mean.float().numpy().reshape(1, -1, 1)
            spec_div = (stats.std.float() + NORM_EPS).numpy().reshape(1, -1, 1)
            spec = (spec - types.Constant(spec_mean, device=device)) / types.Constant(spec_div, device=device)

        outputs = [clips, spec, x["index"]] + ([x["label"]] if with_label else [])
        pipe.set_outputs(*outputs)
    return pipe


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


class DaliLoader:
    """Iterable of batch dicts (see the module docstring); ``set_epoch`` before each epoch.

    ``len(loader)`` is the number of batches per epoch on this rank. Breaking out of an epoch is
    allowed: the next iteration drains what DALI had prefetched and starts the new epoch.
    ``bad_files`` maps the path of every replaced file to its reason.
    """

    def __init__(self, manifest: Union[Manifest, ShardIndex], *, video: VideoConfig, preset: SpectrogramPreset,
                 stats: Optional[SpectrogramStats], batch_size: int, train: bool, seed: int, rank: int,
                 world_size: int, device_id: Optional[int], num_threads: int, jitter: AudioJitter,
                 clips_per_video: int, samples_per_epoch: Optional[int], drop_last: bool,
                 prefetch_queue_depth: int, validate: str, max_bad_fraction: float, read_threads: Optional[int]):
        self.manifest, self.video, self.preset, self.stats = manifest, video, preset, stats
        self.batch_size, self.train, self.seed, self.device_id = batch_size, train, seed, device_id
        self.drop_last = drop_last
        shards = isinstance(manifest, ShardIndex)
        if shards:
            if clips_per_video != 1 or samples_per_epoch is not None:
                raise ValueError("clips_per_video and samples_per_epoch are not supported on shards: an epoch over "
                                 "shards reads every sample once")
            self.sampler = ShardGroupedSampler(manifest.shard, rank=rank, world_size=world_size,
                                               seed=seed, shuffle=train, batch_size=batch_size)
        else:
            self.sampler = ShardedEpochSampler(len(manifest), rank=rank, world_size=world_size, seed=seed,
                                               shuffle=train, clips_per_video=clips_per_video,
                                               samples_per_epoch=samples_per_epoch)
        if len(self) == 0:
            raise ValueError(f"rank {rank} reads {len(self.sampler)} samples per epoch, fewer than batch_size "
                             f"{batch_size} with drop_last=True: no batches")
        common = dict(video=video, preset=preset, jitter=jitter, train=train, seed=seed, batch_size=batch_size,
                      drop_last=drop_last, gpu=device_id is not None, validate=validate,
                      max_bad_fraction=max_bad_fraction,
                      read_threads=read_threads if read_threads is not None else num_threads)
        if shards:
            self.has_labels = bool(manifest.classes)
            self._source = _ShardSource(manifest, self.sampler, **common)
        else:
            self.has_labels = manifest.has_labels
            labels = manifest.label_indices() if self.has_labels else None
            self._source = _Source(manifest, self.sampler, labels=labels, **common)
        self._pipe_args = dict(video=video, preset=preset, stats=stats, train=train, with_label=self.has_labels,
                               batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                               prefetch_queue_depth=prefetch_queue_depth)
        self._iterator = None
        self._needs_reset = False  # the DALI iterator saw StopIteration (or must be drained)
        self._in_epoch = False

    @property
    def bad_files(self) -> Dict[str, str]:
        return dict(self._source.bad_files)

    @property
    def bad_reads(self) -> int:
        return self._source.bad_reads

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch; ``skip_batches`` resumes it after its first batches."""
        self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)

    def __len__(self) -> int:
        per_rank = len(self.sampler)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch_order(self) -> List[Tuple[int, int]]:
        """This rank's (position, video index) pairs for the current epoch, before replacements."""
        return list(self.sampler)

    def plan(self, position: int, index: int, attempt: int = 0) -> SamplePlan:
        """The parameters drawn for (position, index) in the current epoch (what the graph receives)."""
        return self._source.plan(position, index, attempt, epoch=self.sampler.epoch)

    def _output_map(self) -> List[str]:
        return ["video", "audio", "index"] + (["label"] if self.has_labels else [])

    def _drain(self) -> None:
        self._source.abort = True
        try:
            for _ in self._iterator:
                pass
        except StopIteration:
            pass
        self._needs_reset = True

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self._in_epoch and self._iterator is not None:
            self._drain()
        self._source.start_epoch(self.sampler.epoch)
        if self._iterator is None:
            pipe = _build_pipeline(self._source, **self._pipe_args)
            pipe.build()
            self._iterator = DALIGenericIterator(pipe, self._output_map(), auto_reset=False,
                                                 prepare_first_batch=False)
        elif self._needs_reset:
            self._iterator.reset()
        self._needs_reset = False
        self._in_epoch = True
        return self._epoch()

    def _epoch(self) -> Iterator[Dict[str, torch.Tensor]]:
        while True:
            try:
                out = next(self._iterator)
            except StopIteration:
                self._needs_reset = True
                self._in_epoch = False
                return
            except RuntimeError as error:
                if "Critical error" not in str(error) and "no longer valid" not in str(error):
                    raise  # ours (e.g. max_bad_fraction), already clear
                recent = sorted({p for batch in self._source.recent for p in batch})
                raise RuntimeError(
                    f"the DALI pipeline failed, most likely on a file it could not decode; one of: "
                    f"{', '.join(recent[:64])}. Reject such files with `avidfast prepare` or build the loader "
                    f"with validate='probe'. DALI said: {error}"
                ) from None
            batch = out[0]
            batch["index"] = batch["index"].long()
            if "label" in batch:
                batch["label"] = batch["label"].long()
            yield batch

    def close(self) -> None:
        self._source.close()
        self._iterator = None

    def __del__(self):
        try:
            self._source.close()
        except Exception:
            pass


def _check_manifest_audio(manifest: Union[Manifest, ShardIndex]) -> None:
    if isinstance(manifest, ShardIndex):
        audio = [e for e, ext in enumerate(manifest.exts) if ext in AUDIO_MEMBER_EXTENSIONS]
        without = np.flatnonzero((manifest.offset[:, audio] < 0).all(axis=1)) if audio else np.arange(len(manifest))
        if without.size:
            sample = manifest.samples[int(without[0])]
            raise DaliInputError(f"shard sample {sample.key} ({manifest.shard_path(sample.shard)}): no WAV/FLAC "
                                 f"member; DALI decodes audio only from extracted files; {_PREPARE_HINT} --shards")
        return
    for i, row in enumerate(manifest.rows):
        extracted = row.get("audio_path")
        if not extracted:
            raise DaliInputError(
                f"manifest row {i} ({manifest.path(i)}): no audio_path; DALI decodes audio only from extracted "
                f"WAV/FLAC/OGG files (not AAC/MP4); {_PREPARE_HINT}"
            )
        if not str(extracted).lower().endswith(AUDIO_EXTENSIONS):
            raise DaliInputError(
                f"manifest row {i}: audio_path {manifest.audio_path(i)} is not WAV/FLAC/OGG, which is all "
                f"fn.decoders.audio reads; {_PREPARE_HINT}"
            )


def build_dali_loader(
    manifest: Union[Manifest, str, ShardIndex],
    *,
    video: VideoConfig,
    audio_preset: Union[str, SpectrogramPreset],
    stats: Optional[SpectrogramStats],
    batch_size: int,
    mode: str = "train",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device_id: Optional[int] = None,
    num_threads: int = 2,
    jitter: AudioJitter = AudioJitter(),
    clips_per_video: int = 1,
    samples_per_epoch: Optional[int] = None,
    drop_last: bool = True,
    prefetch_queue_depth: int = 2,
    validate: Optional[str] = None,
    max_bad_fraction: float = 0.05,
    read_threads: Optional[int] = None,
) -> DaliLoader:
    """A DALI loader yielding the batch contract of the CPU pipeline.

    Returns an iterable of dicts: ``video`` (B, 3, video.frames, video.crop, video.crop) float32
    normalised with video.mean/std; ``audio`` (B, 1, preset.bins, preset.frames) float32 (dB,
    Z-normalised with ``stats`` when given); ``index`` (B,) int64 manifest rows; ``label`` (B,)
    int64 when the manifest has labels. B = batch_size (the last batch may be smaller with
    drop_last=False).

    manifest: a Manifest or the path of a manifest CSV; every row needs an ``audio_path`` to a
        WAV/FLAC/OGG file (``avidfast prepare --extract-audio wav``). ``duration`` / ``fps`` /
        ``width`` / ``height`` are taken from the manifest and probed with PyAV where missing.
        Or a :class:`~avidfast.data.shards.index.ShardIndex` (``read_index(OUT/shards)``): the
        samples are read from the shards in the shard-grouped order of
        :mod:`avidfast.data.shards.order` (each rank its own shards), ``index`` and ``label`` from
        each sample's JSON; ``clips_per_video`` and ``samples_per_epoch`` must stay at their defaults.
    mode: 'train' (shuffled; random clip start, crop, flip, colour and audio jitter) or 'eval'
        (in order; the clip in the middle of the file, short side to crop/0.875 and centre crop,
        un-jittered audio from the clip start; deterministic).
    rank, world_size, seed, clips_per_video, samples_per_epoch: as ShardedEpochSampler.
    device_id: CUDA device for decoding (NVDEC) and the GPU ops; None runs everything on the CPU,
        where only VP8/VP9/MJPEG video decodes.
    num_threads: DALI worker threads; read_threads: Python threads reading files (default the same).
    validate: 'probe' opens every file once with PyAV (codec check, unreadable files replaced
        before DALI sees them; the default on CPU) or 'exists' (existence and size only; the
        default on GPU, where probing would cost throughput).
    max_bad_fraction: stop when more than this share of the manifest's files turned out unusable.
    The ``reference`` audio preset (paired-bin STFT, dB floor per example) is refused: use the CPU
    pipeline for it.
    """
    preset = get_preset(audio_preset) if isinstance(audio_preset, str) else audio_preset
    if not dali_can_compute(preset):
        raise ValueError(f"audio preset '{preset.name}': its paired-bin STFT and per-example dB floor are not "
                         "built from DALI operators; use the CPU pipeline (data.pipeline=cpu / ClipDataset)")
    require_dali()
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got '{mode}'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if validate is None:
        validate = "exists" if device_id is not None else "probe"
    if validate not in ("probe", "exists"):
        raise ValueError(f"validate must be 'probe' or 'exists', got '{validate}'")
    if isinstance(manifest, str):
        manifest = read_manifest(manifest)
    if stats is not None and stats.mean.numel() != preset.bins:
        raise ValueError(f"spectrogram stats have {stats.mean.numel()} bins, preset '{preset.name}' has {preset.bins}")
    _check_manifest_audio(manifest)
    return DaliLoader(manifest, video=video, preset=preset, stats=stats, batch_size=batch_size,
                      train=mode == "train", seed=seed, rank=rank, world_size=world_size, device_id=device_id,
                      num_threads=num_threads, jitter=jitter, clips_per_video=clips_per_video,
                      samples_per_epoch=samples_per_epoch, drop_last=drop_last,
                      prefetch_queue_depth=prefetch_queue_depth, validate=validate, max_bad_fraction=max_bad_fraction,
                      read_threads=read_threads)
