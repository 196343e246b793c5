"""Clip frames decoded with torchcodec, the decoder the PyTorch ecosystem is moving to: the same
contract as :func:`avidfast.data.video.decode_frames` (PyAV), for the CPU pipeline's
``decoder="torchcodec"``.

torchcodec is optional: :func:`torchcodec_error` says why it cannot be used here (not installed,
or its FFmpeg libraries missing). Its first use in a process costs about 2 s of CPU (loading
its libraries); after that it decodes small copies faster than PyAV (BENCHMARKS.md). torchcodec decodes whole
frames to RGB and offers no crop at a given position, so the crop and the bilinear, antialiased
resize are done here in torch on the decoded frames; on small copies (``avidfast prepare
--short-side``) that costs little, on full-size video PyAV's crop-before-conversion is cheaper.
torchcodec opens FFmpeg's best video stream, which for the files ``avidfast prepare`` writes (one
video stream) is the stream PyAV reads.
"""
from typing import Optional, Tuple

import numpy as np
import torch

from avidfast.data.video import VideoConfig

SEEK_MODE = "exact"  # "approximate" derives frame indices from the average rate: wrong for variable frame rates
_ERROR: Optional[str] = None
_CHECKED = False


def torchcodec_error() -> Optional[str]:
    """None when torchcodec can decode here, else why not (one line); checked once per process."""
    global _ERROR, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        try:
            from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads its FFmpeg libraries)
        except Exception as error:  # ImportError, or an OSError/RuntimeError from the FFmpeg libraries
            _ERROR = f"torchcodec unavailable: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
    return _ERROR


def decode_frames_torchcodec(
    path: str,
    start: float,
    config: VideoConfig,
    *,
    crop: Optional[Tuple[int, int, int, int]] = None,
    size: Optional[Tuple[int, int]] = None,
    threads: int = 1,
) -> np.ndarray:
    """Frames shown at start + i / fps, i < frames, as uint8 (T, H, W, 3) RGB.

    crop=(top, left, height, width) in source pixels, then size=(height, width): bilinear with
    antialiasing (torch). Like the PyAV decoder, the last frame stays on screen for about a frame
    past its time; a clip reaching further raises ValueError ("video ends early").
    """
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, seek_mode=SEEK_MODE, num_ffmpeg_threads=threads, dimension_order="NHWC")
    meta = decoder.metadata
    times = [start + i / config.fps for i in range(config.frames)]
    end = meta.end_stream_seconds
    if end is None and meta.duration_seconds is not None:
        end = (meta.begin_stream_seconds or 0.0) + meta.duration_seconds
    if end is not None:
        frame_seconds = 1.0 / meta.average_fps if meta.average_fps else 0.0
        if times[-1] > end - frame_seconds + 2 / config.fps:
            raise ValueError(f"video ends early: clip from {start:.2f} s runs past {end:.2f} s")
        last = end - min(1e-3, frame_seconds / 2)
        times = [min(t, last) for t in times]
    first = meta.begin_stream_seconds or 0.0
    times = [max(t, first) for t in times]  # before the first frame, PyAV shows the first frame too
    frames = decoder.get_frames_played_at(times).data  # (T, H, W, 3) uint8
    if crop is not None:
        top, left, height, width = crop
        frames = frames[:, top: top + height, left: left + width]
    if size is not None and tuple(frames.shape[1:3]) != tuple(size):
        # uint8 in channels-last layout: torch's vectorised antialiased bilinear path
        planar = frames.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        frames = torch.nn.functional.interpolate(planar, size=tuple(size), mode="bilinear", align_corners=False,
                                                 antialias=True).permute(0, 2, 3, 1)
    return frames.contiguous().numpy()
