"""A loader shaped like the reference implementation's, as the data-pipeline benchmark baseline.

Per clip: PyAV decodes every frame from the clip start and converts each one to a PIL image;
frames are picked at 16 fps; each frame then goes through PIL transforms (crop + bilinear
resize, mirror, brightness / contrast / saturation / hue enhancement with the clip's shared
parameters) and becomes a normalised tensor; the audio window is decoded with PyAV and its
spectrogram computed with a framed numpy FFT. Its output follows the same contract, and the
same random draws as :class:`avidfast.data.cpu_pipeline.ClipDataset`, so the two do the same work.
"""
import numpy as np
import torch

from avidfast.data import audio as audio_ops
from avidfast.data import video as video_ops
from avidfast.data.cpu_pipeline import ClipDataset
from avidfast.data.sampling import sample_generator


def pil_frames(path: str, start: float, config: video_ops.VideoConfig):
    """The frames shown at start + i / fps as PIL images: seek, decode forward, convert each
    needed frame with frame.to_image()."""
    import av

    times = [start + i / config.fps for i in range(config.frames)]
    picked, previous = [], None
    with av.open(path) as container:
        stream = container.streams.video[0]
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            t = float(frame.pts * stream.time_base)
            while len(picked) < len(times) and t > times[len(picked)] + 1e-6:
                picked.append((previous or frame).to_image())
            if len(picked) == len(times):
                break
            previous = frame
    while len(picked) < len(times):
        picked.append(previous.to_image())
    return picked


def _pil_hue(image, hue: float):
    from PIL import Image

    h, s, v = image.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.int16) + int(round(hue * 255))) % 256
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")


def pil_transform(image, aug: video_ops.ClipAugment, config: video_ops.VideoConfig) -> torch.Tensor:
    from PIL import Image, ImageEnhance, ImageOps

    top, left, h, w = aug.crop
    image = image.resize((config.crop, config.crop), Image.BILINEAR, box=(left, top, left + w, top + h))
    if aug.flip:
        image = ImageOps.mirror(image)
    for op in aug.order:
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(aug.brightness)
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(aug.contrast)
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(aug.saturation)
        else:
            image = _pil_hue(image, aug.hue)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return (x - mean) / std


def numpy_log_spectrogram(wave: np.ndarray, preset: audio_ops.SpectrogramPreset) -> np.ndarray:
    """(S,) float32 -> (bins, S // hop) dB: reflect-padded, centred Hann frames and np.fft.rfft."""
    half = preset.n_fft // 2
    padded = np.pad(wave, half, mode="reflect")
    window = np.hanning(preset.n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
    count = audio_ops.frames_for(wave.size, preset)
    frames = np.stack([padded[i * preset.hop_length: i * preset.hop_length + preset.n_fft] for i in range(count)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    return (10.0 * np.log10(np.maximum(power, audio_ops.AMIN))).T.astype(np.float32)


def numpy_resize_time(spec: np.ndarray, frames: int) -> np.ndarray:
    t = spec.shape[1]
    if t == frames:
        return spec
    src = np.clip((np.arange(frames) + 0.5) * t / frames - 0.5, 0, t - 1)
    return np.stack([np.interp(src, np.arange(t), row) for row in spec]).astype(np.float32)


class ReferenceShapedDataset(ClipDataset):
    """ClipDataset's training examples computed the reference's way (PIL per frame, numpy STFT)."""

    def load(self, index: int, epoch: int, position: int, attempt: int = 0):
        if self.mode != "train":
            raise ValueError("the reference-shaped baseline implements the training transform only")
        path = self.manifest.path(index)
        duration, audio_duration = self.durations(index)
        generator = sample_generator(self.seed, epoch, position, attempt)
        start = float(torch.rand((), generator=generator, dtype=torch.float64)) * max(0.0, duration - self.video.seconds)
        images = pil_frames(path, start, self.video)
        aug = video_ops.draw_augment(images[0].height, images[0].width, self.video, generator)
        video = torch.stack([pil_transform(image, aug, self.video) for image in images], dim=1)
        window = audio_ops.train_window(start, self.jitter, generator, audio_duration)
        wave = audio_ops.decode_audio(self.manifest.audio_path(index), window.start, window.duration).numpy()
        spec = numpy_resize_time(numpy_log_spectrogram(wave * window.gain, self.preset), self.preset.frames)
        if self.stats is not None:
            spec = (spec - self.stats.mean.numpy()[:, None]) / (self.stats.std.numpy()[:, None] + audio_ops.NORM_EPS)
        from avidfast.data.cpu_pipeline import LoadedClip

        label = self.labels[index] if self.labels is not None else None
        return LoadedClip(video, torch.from_numpy(spec).unsqueeze(0), index, label)
