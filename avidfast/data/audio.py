"""Audio pre-processing shared by the CPU and DALI pipelines (supplement section A).

Waveform (24 kHz mono float32) -> x gain -> power spectrogram (Hann window, centred frames with
reflect padding) -> dB -> time resized to the preset's frames -> per-bin Z-normalisation.

The presets follow Tables 5 and 6: ``table5`` is 129 bins x 100 frames (n_fft 256, 20 ms hop,
2 s) and ``table6`` 257 bins x 200 frames (n_fft 512, 10 ms hop, 2 s). The window spans n_fft
samples (the FFT cannot be shorter than its window). A window of ``seconds`` seconds is
``frames * hop_length`` samples; centred framing gives one frame more, and the last is dropped,
so every frame's centre lies inside the window.

The ``reference`` preset reproduces the spectrogram of the paper's released checkpoints
(facebookresearch/AVID-CMA, datasets/preprocessing.py, librosa 0.7): an STFT of 2 x n_fft samples
(Hann window of that length, centred, reflect padding), power, bin 0 kept and bins 1.. averaged in
adjacent pairs (n_fft 512 -> 257 bins), 10 ms hop, dB floored 100 dB below each example's maximum;
Z-normalised with the per-bin mean/std the user supplies. The CPU pipeline computes it; the DALI
pipeline refuses it.
"""
from dataclasses import dataclass
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from avidfast.errors import AvidfastError
from avidfast.files import atomic_write

SAMPLE_RATE = 24000  # Hz, the paper's rate (supplement A)
AMIN = 1e-10  # power floor before the log, so silence gives -100 dB rather than -inf
NORM_EPS = 1e-5  # added to the per-bin std in Z-normalisation
MAX_MISSING_AUDIO = 0.1  # s: a read that ends this close to the window's end is zero-padded


@dataclass(frozen=True)
class SpectrogramPreset:
    """Shape and framing of the log-spectrogram an audio encoder expects."""

    name: str
    n_fft: int  # FFT size and window length, samples (paired_bins: half of them)
    hop_length: int  # samples between frames
    frames: int  # time frames of the output
    sample_rate: int = SAMPLE_RATE
    paired_bins: bool = False  # STFT of 2 * n_fft samples, bin 0 kept, bins 1.. averaged in pairs
    top_db: Optional[float] = None  # dB floor below each example's maximum (None: no floor)

    @property
    def bins(self) -> int:
        """Frequency bins of the output (n_fft // 2 + 1, also with paired_bins)."""
        return self.n_fft // 2 + 1

    @property
    def fft_size(self) -> int:
        """Samples per STFT frame and window length: n_fft, or 2 * n_fft with paired_bins."""
        return 2 * self.n_fft if self.paired_bins else self.n_fft

    @property
    def seconds(self) -> float:
        """Duration of audio one example covers, in seconds."""
        return self.frames * self.hop_length / self.sample_rate

    @property
    def samples(self) -> int:
        """Samples in one un-jittered window (frames * hop_length)."""
        return self.frames * self.hop_length


class SpectrogramStatsError(AvidfastError, ValueError):
    """A spectrogram statistics file that cannot be read or belongs to another preset."""


PRESETS = {
    "table5": SpectrogramPreset("table5", n_fft=256, hop_length=480, frames=100),
    "table6": SpectrogramPreset("table6", n_fft=512, hop_length=240, frames=200),
    "reference": SpectrogramPreset("reference", n_fft=512, hop_length=240, frames=200, paired_bins=True, top_db=100.0),
}


def dali_can_compute(preset: SpectrogramPreset) -> bool:
    """Whether the DALI pipeline builds this preset from its operators (no paired bins, no dB floor)."""
    return not preset.paired_bins and preset.top_db is None


DALI_PRESETS = tuple(name for name, preset in PRESETS.items() if dali_can_compute(preset))


def get_preset(name: str) -> SpectrogramPreset:
    """The preset called ``name`` (``table5``, ``table6`` or ``reference``)."""
    if name not in PRESETS:
        raise ValueError(f"audio preset '{name}': unknown; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def hann_window(preset: SpectrogramPreset, device=None) -> torch.Tensor:
    """The periodic Hann window of preset.fft_size samples (float32), as both pipelines use it."""
    return torch.hann_window(preset.fft_size, periodic=True, dtype=torch.float32, device=device)


def frames_for(samples: int, preset: SpectrogramPreset) -> int:
    """Spectrogram frames kept for a waveform of ``samples`` samples (centred framing, last dropped)."""
    return max(1, samples // preset.hop_length)


def power_spectrogram(wave: torch.Tensor, preset: SpectrogramPreset) -> torch.Tensor:
    """|STFT|^2 of wave (..., S) float32 -> (..., bins, frames_for(S)) float32.

    Frames of preset.fft_size samples are centred on multiples of hop_length, with reflect padding
    at both ends. With preset.paired_bins, bin 0 is kept and bins 1.. are averaged in pairs.
    """
    lead = wave.shape[:-1]
    flat = wave.reshape(-1, wave.shape[-1]).float()
    if flat.shape[-1] <= preset.fft_size // 2:
        raise ValueError(f"wave has {flat.shape[-1]} samples; needs more than half the FFT size, "
                         f"{preset.fft_size // 2}")
    spec = torch.stft(
        flat, preset.fft_size, hop_length=preset.hop_length, window=hann_window(preset, flat.device),
        center=True, pad_mode="reflect", return_complex=True,
    )
    power = spec.real.square() + spec.imag.square()
    power = power[..., : frames_for(flat.shape[-1], preset)]
    if preset.paired_bins:
        pairs = power[:, 1:].unflatten(1, (preset.bins - 1, 2)).mean(2)
        power = torch.cat([power[:, :1], pairs], 1)
    return power.reshape(*lead, *power.shape[-2:])


def to_db(power: torch.Tensor) -> torch.Tensor:
    """10 log10(max(power, AMIN)) in dB (reference power 1)."""
    return 10.0 * torch.log10(power.clamp_min(AMIN))


def floor_db(spec_db: torch.Tensor, top_db: float) -> torch.Tensor:
    """spec_db (..., F, T) raised to at least (its maximum over F and T) - top_db, per example."""
    return spec_db.maximum(spec_db.amax(dim=(-2, -1), keepdim=True) - top_db)


def db_spectrogram(wave: torch.Tensor, preset: SpectrogramPreset) -> torch.Tensor:
    """wave (..., S) -> dB power spectrogram (..., bins, frames_for(S)), with the preset's floor."""
    spec = to_db(power_spectrogram(wave, preset))
    return spec if preset.top_db is None else floor_db(spec, preset.top_db)


def resize_frames(spec: torch.Tensor, frames: int) -> torch.Tensor:
    """Linear resize of the last (time) axis of spec (..., F, T) to ``frames`` (half-pixel centres)."""
    if spec.shape[-1] == frames:
        return spec
    lead = spec.shape[:-1]
    out = F.interpolate(spec.reshape(1, -1, spec.shape[-1]), size=frames, mode="linear", align_corners=False)
    return out.reshape(*lead, frames)


def normalize(spec_db: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-bin Z-normalisation: (spec_db (..., F, T) - mean (F,)) / (std (F,) + NORM_EPS)."""
    return (spec_db - mean[:, None]) / (std[:, None] + NORM_EPS)


def log_spectrogram(
    wave: torch.Tensor,
    preset: SpectrogramPreset,
    gain: float = 1.0,
    stats: Optional["SpectrogramStats"] = None,
) -> torch.Tensor:
    """The model's audio input: wave (..., S) -> (..., bins, preset.frames) float32.

    gain multiplies the waveform (volume jitter); a window longer or shorter than preset.samples
    (duration jitter) is resized back to preset.frames; stats, when given, Z-normalise each bin.
    """
    spec = db_spectrogram(wave * gain if gain != 1.0 else wave, preset)
    spec = resize_frames(spec, preset.frames)
    if stats is not None:
        spec = normalize(spec, stats.mean.to(spec.device), stats.std.to(spec.device))
    return spec


@dataclass(frozen=True)
class AudioJitter:
    """Training augmentation of the audio window (supplement A); values per config."""

    volume: Tuple[float, float] = (0.9, 1.1)  # waveform gain range
    max_offset: float = 0.5  # |audio start - video start| <= this, seconds
    duration: Tuple[float, float] = (1.4, 2.8)  # window length range, seconds


@dataclass(frozen=True)
class AudioWindow:
    """Where to read audio and how loud: start and length in seconds, waveform gain."""

    start: float
    duration: float
    gain: float = 1.0


def eval_window(video_start: float, preset: SpectrogramPreset, file_duration: Optional[float]) -> AudioWindow:
    """The un-jittered window: preset.seconds from the video start, moved back inside the file
    (the whole file when it is shorter)."""
    duration = preset.seconds if file_duration is None else min(preset.seconds, file_duration)
    return AudioWindow(_clamp_start(video_start, duration, file_duration), duration, 1.0)


def train_window(
    video_start: float, jitter: AudioJitter, generator: torch.Generator, file_duration: Optional[float]
) -> AudioWindow:
    """A jittered window: start within jitter.max_offset of the video start, duration and gain
    drawn uniformly; the start (and, for a file shorter than the window, the duration) is
    clamped so the window stays inside the file."""
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    duration = jitter.duration[0] + u[0] * (jitter.duration[1] - jitter.duration[0])
    if file_duration is not None:
        duration = min(duration, file_duration)  # a short file gives its whole length
    start = video_start + (2 * u[1] - 1) * jitter.max_offset
    gain = jitter.volume[0] + u[2] * (jitter.volume[1] - jitter.volume[0])
    return AudioWindow(_clamp_start(start, duration, file_duration), duration, gain)


def _clamp_start(start: float, duration: float, file_duration: Optional[float]) -> float:
    if file_duration is not None:
        start = min(start, file_duration - duration)
    return max(0.0, start)


def window_samples(window: AudioWindow, sample_rate: int = SAMPLE_RATE) -> Tuple[int, int]:
    """(first sample, number of samples) of a window at sample_rate."""
    return int(round(window.start * sample_rate)), int(round(window.duration * sample_rate))


@dataclass
class SpectrogramStats:
    """Per-bin mean and std (float32 (bins,)) of the dB spectrogram over a training set."""

    preset: str
    mean: torch.Tensor
    std: torch.Tensor
    count: int  # spectrogram frames averaged (0: unknown, e.g. the reference implementation's file)

    def save(self, path: str) -> None:
        """Writes an .npz atomically (keys preset, mean, std, count), at ``path`` as given."""
        atomic_write(path, lambda f: np.savez(f, preset=self.preset, mean=self.mean.numpy(), std=self.std.numpy(),
                                              count=self.count))

    @classmethod
    def load(cls, path: str, preset: Optional[SpectrogramPreset] = None) -> "SpectrogramStats":
        """Reads stats written by :meth:`save`; checks they match ``preset`` when given.

        A file holding only ``mean`` and ``std`` (the reference implementation's statistics) is
        taken as ``preset``'s, with count 0 (unknown); it needs ``preset``.
        """
        try:
            with np.load(path) as data:
                foreign = "preset" not in data.files and preset is not None
                stats = cls(preset.name if foreign else str(data["preset"]),
                            torch.from_numpy(data["mean"]).float().reshape(-1),
                            torch.from_numpy(data["std"]).float().reshape(-1), 0 if foreign else int(data["count"]))
        except (OSError, KeyError, ValueError) as error:
            raise SpectrogramStatsError(f"spectrogram stats {path}: cannot read ({error}); recreate it with "
                                        "`avidfast stats`") from None
        if preset is not None and (stats.preset != preset.name or stats.mean.numel() != preset.bins):
            raise SpectrogramStatsError(
                f"spectrogram stats {path} are for preset '{stats.preset}' ({stats.mean.numel()} bins), "
                f"not '{preset.name}' ({preset.bins} bins); run `avidfast stats` with --audio-preset {preset.name}"
            )
        return stats


class RunningStats:
    """Accumulates per-bin mean/variance of dB spectrograms in float64 (Chan's parallel update)."""

    def __init__(self, bins: int):
        self.count = 0
        self.mean = torch.zeros(bins, dtype=torch.float64)
        self.m2 = torch.zeros(bins, dtype=torch.float64)

    def add(self, spec_db: torch.Tensor) -> None:
        """Adds every frame of spec_db (bins, T)."""
        x = spec_db.double()
        n = x.shape[-1]
        mean = x.mean(-1)
        m2 = (x - mean[:, None]).square().sum(-1)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta.square() * self.count * n / total
        self.count = total

    def merge(self, other: "RunningStats") -> None:
        """Adds another accumulator's frames."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta.square() * self.count * other.count / total
        self.count = total

    def result(self, preset: str) -> SpectrogramStats:
        if self.count < 2:
            raise ValueError("no audio frames were accumulated: every file failed or the manifest is empty")
        std = (self.m2 / (self.count - 1)).sqrt()
        return SpectrogramStats(preset, self.mean.float(), std.float(), self.count)


def decode_audio(path: Union[str, BinaryIO], start: float, duration: float,
                 sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Reads [start, start + duration) seconds of path's first audio stream (``path``: a file name,
    or an open binary file; one named ``*.wav`` is tried as 16-bit PCM first) as mono float32 (S,)
    at sample_rate (downmixed and resampled by FFmpeg's resampler). Zero-pads up to
    MAX_MISSING_AUDIO seconds (audio streams often end a little before the container's
    duration); raises ValueError when more is missing."""
    import av

    want = int(round(duration * sample_rate))
    first = int(round(start * sample_rate))
    name = path if isinstance(path, str) else str(getattr(path, "name", ""))
    if name.lower().endswith(".wav"):
        wave = _read_pcm_wav(path, first, want, sample_rate)
        if wave is not None:
            return wave
        if not isinstance(path, str):
            path.seek(0)
    with av.open(path) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        if start > 0:
            container.seek(int(max(0.0, start - 0.1) / stream.time_base), stream=stream, backward=True)
        chunks, next_sample = [], None
        for frame in container.decode(stream):
            if frame.pts is not None and next_sample is None:
                next_sample = int(round(float(frame.pts * stream.time_base) * sample_rate))
            for out in resampler.resample(frame):
                chunk = out.to_ndarray().reshape(-1)
                chunks.append((next_sample if next_sample is not None else 0, chunk))
                next_sample = (next_sample or 0) + chunk.size
            if next_sample is not None and next_sample >= first + want:
                break
        for out in resampler.resample(None):
            chunk = out.to_ndarray().reshape(-1)
            chunks.append((next_sample or 0, chunk))
            next_sample = (next_sample or 0) + chunk.size
    wave = np.zeros(want, dtype=np.float32)
    filled = 0
    for offset, chunk in chunks:
        lo, hi = max(offset, first), min(offset + chunk.size, first + want)
        if hi > lo:
            wave[lo - first: hi - first] = chunk[lo - offset: hi - offset]
            filled += hi - lo
    if want - filled > MAX_MISSING_AUDIO * sample_rate:
        raise ValueError(f"audio ends early: {filled / sample_rate:.2f} s of {duration:.2f} s from {start:.2f} s")
    return torch.from_numpy(wave)


def _read_pcm_wav(path: Union[str, BinaryIO], first: int, want: int, sample_rate: int) -> Optional[torch.Tensor]:
    """Reads samples [first, first + want) of a 16-bit mono WAV at sample_rate directly (what
    `avidfast prepare --extract-audio wav` writes); None for any other WAV (PyAV reads those)."""
    import wave

    try:
        with wave.open(path, "rb") as f:
            if f.getnchannels() != 1 or f.getsampwidth() != 2 or f.getframerate() != sample_rate:
                return None
            total = f.getnframes()
            have = max(0, min(want, total - first))
            if want - have > MAX_MISSING_AUDIO * sample_rate:
                raise ValueError(f"audio ends early: {have / sample_rate:.2f} s of {want / sample_rate:.2f} s "
                                 f"from {first / sample_rate:.2f} s")
            f.setpos(min(first, total))
            data = np.frombuffer(f.readframes(have), dtype="<i2")
    except (wave.Error, EOFError):
        return None
    out = np.zeros(want, dtype=np.float32)
    out[: data.size] = data * np.float32(1 / 32768)
    return torch.from_numpy(out)
