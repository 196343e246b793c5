"""Video pre-processing shared by the CPU pipeline (and mirrored by the DALI pipeline).

Frames are sampled at ``fps`` (16) from a clip start; training applies one random resized crop,
flip and colour jitter to every frame of a clip (supplement A, Table 3); evaluation resizes the
short side to crop / 0.875 and centre-crops. Output: (3, T, H, W) float32, normalised.
"""
import math
from dataclasses import dataclass
from typing import BinaryIO, List, Optional, Tuple, Union

import numpy as np
import torch

from avidfast.data.probe import first_video_stream

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # evaluation: short side resized to crop / 0.875, then centre crop


@dataclass(frozen=True)
class VideoConfig:
    """What a video example is and how training augments it (defaults: Table 3, Table 5 input)."""

    frames: int = 16  # T, one of 8, 16, 32
    fps: float = 16.0  # frames per second sampled from the file
    crop: int = 112  # output H = W, pixels (112 or 224)
    min_area: float = 0.08  # random resized crop: area fraction range [min_area, 1]
    aspect: Tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect-ratio range
    flip: float = 0.5  # horizontal flip probability
    brightness: float = 0.4  # colour jitter intensities (factor ranges 1 +- x; hue shift +- x)
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.frames < 1 or self.crop < 1 or self.fps <= 0:
            raise ValueError(f"video frames ({self.frames}), crop ({self.crop}) and fps ({self.fps}) must be positive")
        if not 0 < self.min_area <= 1:
            raise ValueError(f"video min_area must be in (0, 1], got {self.min_area}")

    @property
    def seconds(self) -> float:
        """Duration a clip spans, in seconds (frames / fps)."""
        return self.frames / self.fps


@dataclass(frozen=True)
class ClipAugment:
    """The random parameters drawn once per clip and applied to every frame.

    crop = (top, left, height, width) in source pixels; brightness/contrast/saturation are
    multiplicative factors, hue a shift in turns (-0.5..0.5); order is the jitter order (a
    permutation of 0..3 = brightness, contrast, saturation, hue).
    """

    crop: Tuple[int, int, int, int]
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: Tuple[int, ...] = (0, 1, 2, 3)


def draw_augment(height: int, width: int, config: VideoConfig, generator: torch.Generator) -> ClipAugment:
    """Draws one clip's crop (random resized crop: area in [min_area, 1] of the frame, log-uniform
    aspect ratio, up to 10 tries then the largest centred crop in range), flip and jitter."""
    u = lambda: float(torch.rand((), generator=generator, dtype=torch.float64))  # noqa: E731
    area = height * width
    log_lo, log_hi = math.log(config.aspect[0]), math.log(config.aspect[1])
    crop = None
    for _ in range(10):
        target = area * (config.min_area + (1 - config.min_area) * u())
        ratio = math.exp(log_lo + (log_hi - log_lo) * u())
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u() * (height - h + 1))
            left = int(u() * (width - w + 1))
            crop = (min(top, height - h), min(left, width - w), h, w)
            break
    if crop is None:
        ratio = min(max(width / height, config.aspect[0]), config.aspect[1])
        w, h = (width, int(round(width / ratio))) if width / height < ratio else (int(round(height * ratio)), height)
        w, h = min(w, width), min(h, height)
        crop = ((height - h) // 2, (width - w) // 2, h, w)
    flip = u() < config.flip
    factor = lambda x: max(0.0, 1 - x + 2 * x * u())  # noqa: E731
    brightness, contrast, saturation = factor(config.brightness), factor(config.contrast), factor(config.saturation)
    hue = (2 * u() - 1) * config.hue
    order = tuple(torch.randperm(4, generator=generator).tolist())
    return ClipAugment(crop, flip, brightness, contrast, saturation, hue, order)


def eval_short_side(crop: int) -> int:
    """Evaluation resizes a frame's short side to this many pixels (crop / 0.875), then centre-crops."""
    return int(round(crop / EVAL_CROP_FRACTION))


def eval_size(height: int, width: int, crop: int) -> Tuple[int, int]:
    """(height, width) after resizing the short side to crop / 0.875, keeping the aspect ratio."""
    short = eval_short_side(crop)
    if height <= width:
        return short, max(short, int(round(width * short / height)))
    return max(short, int(round(height * short / width))), short


def train_start(duration: float, config: VideoConfig, generator: torch.Generator) -> float:
    """A training clip's start (seconds), uniform in [0, duration - clip length]: the first draw
    from a sample's generator (both pipelines draw the crop and the audio window after it)."""
    return float(torch.rand((), generator=generator, dtype=torch.float64)) * max(0.0, duration - config.seconds)


def clip_starts(duration: float, config: VideoConfig, count: int) -> List[float]:
    """``count`` evenly spaced clip starts (seconds) covering [0, duration - clip length]."""
    last = max(0.0, duration - config.seconds)
    if count == 1:
        return [last / 2]
    return [last * i / (count - 1) for i in range(count)]


class _Converter:
    """Turns decoded frames into uint8 (H, W, 3) RGB, optionally cropped and resized, in FFmpeg.

    With a crop, a filter graph (crop -> swscale bilinear -> rgb24) touches only the crop's
    pixels; without one, the frame is scaled during colour conversion.
    """

    def __init__(self, stream, crop: Optional[Tuple[int, int, int, int]], size: Optional[Tuple[int, int]]):
        self.stream, self.crop, self.size = stream, crop, size
        self.graph = None
        self.last = (None, None)

    def _build(self) -> None:
        import av

        top, left, h, w = self.crop
        out_h, out_w = self.size if self.size is not None else (h, w)
        graph = av.filter.Graph()
        chain = [
            graph.add_buffer(template=self.stream),
            graph.add("crop", f"w={w}:h={h}:x={left}:y={top}:exact=1"),
            graph.add("scale", f"w={out_w}:h={out_h}:flags=bilinear"),
            graph.add("format", "pix_fmts=rgb24"),
            graph.add("buffersink"),
        ]
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()
        self.graph = graph

    def __call__(self, frame) -> np.ndarray:
        if self.last[0] is frame:  # a frame shown at several sampled times is converted once
            return self.last[1]
        if self.crop is None:
            kwargs = {"format": "rgb24"}
            if self.size is not None:
                kwargs.update(height=self.size[0], width=self.size[1], interpolation="BILINEAR")
            image = frame.to_ndarray(**kwargs)
        else:
            if self.graph is None:
                self._build()
            self.graph.push(frame)
            image = self.graph.pull().to_ndarray()
        self.last = (frame, image)
        return image


REFERENCE_MARGIN = 8  # frames before the clip decoded in full, so B-frame reordering cannot bite


def decode_frames(
    path: Union[str, BinaryIO],
    start: float,
    config: VideoConfig,
    *,
    crop: Optional[Tuple[int, int, int, int]] = None,
    size: Optional[Tuple[int, int]] = None,
    threads: int = 1,
) -> np.ndarray:
    """Frames shown at start + i / fps, i < frames, as uint8 (T, H, W, 3) RGB, from the video file
    ``path`` (a file name, or an open binary file such as a shard member).

    crop=(top, left, height, width) cuts that region of each frame (source pixels) and
    size=(height, width) resizes to it (FFmpeg's swscale, bilinear, antialiased when shrinking);
    both happen in FFmpeg before the colour conversion. Seeks to the keyframe before ``start``
    and decodes forward, skipping frames no other frame references until shortly before the
    clip. Raises ValueError when the stream ends more than a frame early.
    """
    import av

    times = [start + i / config.fps for i in range(config.frames)]
    with av.open(path) as container:
        stream = first_video_stream(container)
        if stream is None:
            raise ValueError("no video stream")
        context = stream.codec_context
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        context.thread_count = threads
        base = stream.time_base
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        full_from = start - REFERENCE_MARGIN / rate
        if start > 0:
            container.seek(int(start / base), stream=stream, backward=True)
            if full_from > 0:
                context.skip_frame = "NONREF"
        convert = _Converter(stream, crop, size)
        out: List[np.ndarray] = []
        previous = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * base)
            if t >= full_from and context.skip_frame != "DEFAULT":
                context.skip_frame = "DEFAULT"
            while len(out) < len(times) and t > times[len(out)] + 1e-6:
                # times[len(out)] falls before this frame: the previous frame was showing then.
                out.append(convert(previous if previous is not None else frame))
            if len(out) == len(times):
                break
            previous = frame
        if len(out) < len(times) and previous is not None:
            # The last frame stays on screen for about a frame; beyond that the clip has ended.
            if times[-1] > float(previous.pts * base) + 2 / config.fps:
                raise ValueError(f"video ends early: {len(out)} of {len(times)} frames from {start:.2f} s")
            out.extend([convert(previous)] * (len(times) - len(out)))
    if not out:
        raise ValueError(f"no video frames decoded from {start:.2f} s")
    return np.stack(out)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    maxc, _ = x.max(-3)
    minc, _ = x.min(-3)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], -3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(-3)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -3)
    return v.unsqueeze(-3) - v.unsqueeze(-3) * s.unsqueeze(-3) * (torch.minimum(k, 4 - k).clamp(0, 1))


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[..., 0, :, :] + 0.587 * x[..., 1, :, :] + 0.114 * x[..., 2, :, :]).unsqueeze(-3)


def colour_jitter(x: torch.Tensor, aug: ClipAugment) -> torch.Tensor:
    """Applies aug's brightness, contrast, saturation and hue, in aug.order, to x (T, 3, H, W) in [0, 1].

    Contrast blends each frame with its mean grey level; saturation with its grey image; hue
    rotates the HSV hue by aug.hue turns. Values are clamped to [0, 1] after each step.
    """
    for op in aug.order:
        if op == 0 and aug.brightness != 1.0:
            x = (x * aug.brightness).clamp_(0, 1)
        elif op == 1 and aug.contrast != 1.0:
            mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
            x = (aug.contrast * x + (1 - aug.contrast) * mean).clamp_(0, 1)
        elif op == 2 and aug.saturation != 1.0:
            x = (aug.saturation * x + (1 - aug.saturation) * _gray(x)).clamp_(0, 1)
        elif op == 3 and aug.hue != 0.0:
            hsv = _rgb_to_hsv(x)
            hsv[..., 0, :, :] = (hsv[..., 0, :, :] + aug.hue) % 1.0
            x = _hsv_to_rgb(hsv).clamp_(0, 1)
    return x


def _normalize_to_ctHW(x: torch.Tensor, config: VideoConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()


def train_transform(frames: np.ndarray, aug: ClipAugment, config: VideoConfig) -> torch.Tensor:
    """uint8 (T, crop, crop, 3), already cropped and resized (decode_frames(crop=aug.crop)) ->
    float32 (3, T, crop, crop): flip, colour jitter and normalisation, the same for every frame."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)
    if aug.flip:
        x = x.flip(-1)
    x = colour_jitter(x, aug)
    return _normalize_to_ctHW(x, config)


def eval_transform(frames: np.ndarray, config: VideoConfig) -> torch.Tensor:
    """uint8 (T, H, W, 3), already resized by :func:`eval_size` -> float32 (3, T, crop, crop):
    centre crop and normalisation."""
    _, height, width, _ = frames.shape
    top, left = (height - config.crop) // 2, (width - config.crop) // 2
    x = torch.from_numpy(frames[:, top: top + config.crop, left: left + config.crop]).permute(0, 3, 1, 2).float().div_(255)
    return _normalize_to_ctHW(x, config)
