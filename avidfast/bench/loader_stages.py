"""Where a training clip's loading time goes, stage by stage, in one process and one thread.

For the CPU pipeline (:class:`avidfast.data.cpu_pipeline.ClipDataset`, with a given frame decoder)
and the reference-shaped loader (:mod:`avidfast.bench.loader_baseline`), the stages of one
training example are timed separately on the same clips and random draws (the draws of
``sampling.sample_generator(seed, epoch=0, position=i)``):

  * ``decode``: the 16 frames, decoded and cropped / resized to the crop size (ours: in FFmpeg's
    filter graph, or torchcodec + torch; baseline: PyAV + ``frame.to_image()`` for every frame);
  * ``augment``: flip, colour jitter, normalisation (baseline: the PIL transforms per frame);
  * ``audio read``: the jittered audio window (a WAV beside the clip, or decoded AAC);
  * ``spectrogram``: log-power spectrogram, resized to the preset's frames (ours: torch.stft;
    baseline: a framed numpy FFT).

Times are medians over the clips, in milliseconds per clip.
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

from avidfast.bench import loader_baseline
from avidfast.data import audio as audio_ops
from avidfast.data import video as video_ops
from avidfast.data.audio import AudioJitter
from avidfast.data.cpu_pipeline import ClipDataset, frame_size
from avidfast.data.manifest import Manifest
from avidfast.data.sampling import sample_generator
from avidfast.data.video import VideoConfig

STAGES = ("decode", "augment", "audio read", "spectrogram")


@dataclass
class StageTimes:
    """Milliseconds per clip of each stage (medians over ``clips`` clips) for one loader."""

    name: str
    clips: int
    ms: Dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.ms.values())


def _timed(samples: Dict[str, List[float]], stage: str, fn: Callable, *args, **kwargs):
    begin = time.perf_counter()
    value = fn(*args, **kwargs)
    samples[stage].append((time.perf_counter() - begin) * 1000.0)
    return value


def profile_stages(manifest: Manifest, video: VideoConfig, audio_preset: str, clips: int, *, seed: int = 0,
                   decoder: str = "pyav", reference_shaped: bool = False, name: str = "") -> StageTimes:
    """Times the stages of ``clips`` training examples (rows taken in turn); one thread.

    ``decoder`` picks ours ("pyav" or "torchcodec"); ``reference_shaped`` times the baseline's
    stages instead.
    """
    dataset = ClipDataset(manifest, video=video, audio_preset=audio_preset, jitter=AudioJitter(), seed=seed,
                          decoder="pyav" if reference_shaped else decoder)
    samples: Dict[str, List[float]] = {stage: [] for stage in STAGES}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for position in range(clips):
            index = position % len(manifest)
            path, row = manifest.path(index), manifest.rows[index]
            duration, audio_duration = dataset.durations(index)
            generator = sample_generator(seed, 0, position, 0)
            start = video_ops.train_start(duration, video, generator)
            if reference_shaped:
                images = _timed(samples, "decode", loader_baseline.pil_frames, path, start, video)
                aug = video_ops.draw_augment(images[0].height, images[0].width, video, generator)
                _timed(samples, "augment", lambda: torch.stack(
                    [loader_baseline.pil_transform(image, aug, video) for image in images], dim=1))
            else:
                height, width = frame_size(row, path)
                aug = video_ops.draw_augment(height, width, video, generator)
                frames = _timed(samples, "decode", dataset.frame_decoder, path, start, video,
                                crop=aug.crop, size=(video.crop, video.crop))
                _timed(samples, "augment", video_ops.train_transform, frames, aug, video)
            window = audio_ops.train_window(start, dataset.jitter, generator, audio_duration)
            wave = _timed(samples, "audio read", audio_ops.decode_audio, manifest.audio_path(index), window.start,
                          window.duration, dataset.preset.sample_rate)
            if reference_shaped:
                _timed(samples, "spectrogram", lambda: loader_baseline.numpy_resize_time(
                    loader_baseline.numpy_log_spectrogram(wave.numpy() * window.gain, dataset.preset),
                    dataset.preset.frames))
            else:
                _timed(samples, "spectrogram", audio_ops.log_spectrogram, wave, dataset.preset, gain=window.gain)
    finally:
        torch.set_num_threads(threads)
    return StageTimes(name or ("reference-shaped" if reference_shaped else f"ours ({decoder})"), clips,
                      {stage: statistics.median(values) for stage, values in samples.items()})


def format_stage_table(rows: List[StageTimes]) -> str:
    """One line per loader: ms per clip of each stage and the total."""
    lines = [f"{'loader':<28} " + " ".join(f"{stage:>12}" for stage in STAGES) + f" {'total':>8}  (ms per clip, "
             "median, 1 thread)"]
    for row in rows:
        lines.append(f"{row.name:<28} " + " ".join(f"{row.ms[stage]:>12.1f}" for stage in STAGES)
                     + f" {row.total:>8.1f}")
    return "\n".join(lines)
