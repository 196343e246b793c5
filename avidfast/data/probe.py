"""Probing media files with PyAV: what they hold, and whether they can be trained on.

:func:`probe` never raises for a bad file: whatever goes wrong is reported in
``ProbeResult.error``, and :func:`reject_reason` turns a result into a short human-readable
reason to skip the file (or ``None`` to keep it).

What the default ``check="fast"`` pass does, in one read of the file:
  * opens the container and reads the stream headers;
  * demuxes every packet of the first video and first audio stream (cheap: no decoding) to
    measure the real end of each stream, which catches truncated files whose header promises
    more than the file holds, and unreadable containers;
  * decodes every audio packet (cheap), which catches most corruption in interleaved files;
  * decodes the first few video frames and the last second of video (from the keyframe before it).
``check="full"`` decodes every video frame as well, in strict mode (FFmpeg's
``err_detect=explode``: errors that the decoder would conceal count too), which catches corrupt
video packets anywhere at the cost of a full decode; being strict, it also rejects streams whose
first packets cannot be decoded (e.g. cut without re-encoding at a non-keyframe), which the fast
check accepts. Without it, a corrupt video packet in the middle of a stream goes unnoticed when
the decoder conceals it (H.264 does) or it is never decoded; in interleaved files such damage
usually hits audio packets too, and those are all decoded. ``check="header"`` only reads headers.

Durations: one rule, for every reader of a file (``avidfast prepare``, both loaders, ``avidfast
stats``). A clip's ``duration`` is its video stream's own, from its first frame to the end of its
last one; ``audio_duration`` is its audio stream's. The container's duration is only the fallback
for a stream that states none (Matroska/WebM keep no per-stream duration), never preferred: it is
the longest stream's (plus start offsets), and audio often outlasts the picture (AAC padding, a
soundtrack longer than the video), so a clip placed within it can start or run past the last
frame. ``check="header"`` (:func:`probe_header`, what the loaders use for a manifest row without
the metadata ``avidfast prepare`` writes) takes the durations the stream headers state, else the
container's; ``fast`` and ``full`` measure them from the packets, check the stated ones against
the measurement (truncation) and report the measured ones.
"""
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

CHECKS = ("header", "fast", "full")


@dataclass
class ProbeResult:
    """What :func:`probe` found. Times in seconds, rates in Hz; ``None`` where unknown.

    ``duration`` is the video stream's (from its first frame to the end of its last one) when
    there is video, else the audio's (the rule: module docstring). ``fps`` is the stream's
    average rate (frames / duration for variable frame rate files). ``video_start`` and
    ``audio_start`` are the presentation times of the first decoded frame of each stream (what the
    timestamps of the streams are relative to).
    ``error`` is why the file cannot be used (unreadable, truncated, corrupt), ``None`` if the
    checks passed; whether it is long enough or has both streams is for :func:`reject_reason`.
    """

    path: str
    size_bytes: int = 0
    container: Optional[str] = None
    duration: Optional[float] = None
    has_video: bool = False
    fps: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    video_codec: Optional[str] = None
    num_frames: Optional[int] = None
    video_start: Optional[float] = None
    has_audio: bool = False
    audio_duration: Optional[float] = None
    sample_rate: Optional[int] = None
    channels: Optional[int] = None
    audio_codec: Optional[str] = None
    audio_start: Optional[float] = None
    error: Optional[str] = None

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "ProbeResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def reject_reason(result: ProbeResult, min_seconds: float, require_audio: bool = True) -> Optional[str]:
    """Why a probed file should not be used (short, human-readable), or ``None`` to keep it.

    Any size, frame rate (constant or not), sample rate and channel count is accepted. Without
    ``require_audio`` (sets for video-only evaluation) a file without an audio stream is kept.
    """
    if result.error:
        return result.error
    if not result.has_video:
        return "no video stream"
    if not result.has_audio and require_audio:
        return "no audio stream"
    if not result.width or not result.height:
        return "video has no frame size"
    if result.duration is None:
        return "unknown duration"
    if result.duration < min_seconds:
        return f"shorter than {min_seconds:g} s ({result.duration:.1f} s)"
    if result.has_audio and result.audio_duration is not None and result.audio_duration < min_seconds:
        return f"audio shorter than {min_seconds:g} s ({result.audio_duration:.1f} s)"
    return None


def error_message(error: BaseException) -> str:
    """FFmpeg's message without the errno and the file name PyAV adds (one line, at most 200 characters)."""
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return " ".join(str(text).split())[:200]


def is_attached_picture(stream) -> bool:
    """True for a "video" stream that is cover art (one still picture), not the clip's video."""
    try:
        import av

        return bool(int(stream.disposition) & int(av.stream.Disposition.attached_pic))
    except Exception:
        return False


def first_video_stream(container):
    """The container's first video stream that is not cover art, or None: the stream every reader uses."""
    return next((s for s in container.streams.video if not is_attached_picture(s)), None)


def _seconds(value, time_base) -> Optional[float]:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


class _Failed(Exception):
    """Internal: the reason a file is unusable (becomes ``ProbeResult.error``)."""


def probe(path: str, *, check: str = "fast", start_frames: int = 4, tail_seconds: float = 1.0,
          max_seconds: float = 120.0) -> ProbeResult:
    """Probes one file; never raises for a bad file (see the module docstring for ``check``).

    ``start_frames`` video frames are decoded at the start and ``tail_seconds`` at the end;
    ``max_seconds`` bounds the wall-clock time spent (then the file is reported as unreadable).
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    result = ProbeResult(path=path)
    try:
        _probe(result, check, start_frames, tail_seconds, time.monotonic() + max_seconds, max_seconds)
    except _Failed as failure:
        result.error = str(failure)
    except MemoryError:
        result.error = "out of memory while probing"
    except Exception as error:  # a bug or an exotic failure: still a reason, not a crash
        result.error = f"probe failed: {type(error).__name__}: {error_message(error)}"
    return result


def probe_header(path: str, stream: str = "video") -> ProbeResult:
    """``probe(path, check="header")`` for a reader about to use one ``stream`` ('video' or 'audio')
    of the file: raises ValueError with the reason when the file is unusable or has no such stream.

    Durations follow the module docstring's rule (the stream's stated duration, else the container's).
    """
    if stream not in ("video", "audio"):
        raise ValueError(f"stream must be 'video' or 'audio', got {stream!r}")
    result = probe(path, check="header")
    if result.error:
        raise ValueError(result.error)
    if not (result.has_video if stream == "video" else result.has_audio):
        raise ValueError(f"no {stream} stream")
    return result


def _probe(result: ProbeResult, check: str, start_frames: int, tail_seconds: float, deadline: float,
           max_seconds: float) -> None:
    import av

    try:
        stat = os.stat(result.path)
    except FileNotFoundError:
        raise _Failed("no such file") from None
    except OSError as error:
        raise _Failed(f"cannot read: {error_message(error)}") from None
    if not os.path.isfile(result.path):
        raise _Failed("not a regular file")
    result.size_bytes = stat.st_size
    if stat.st_size == 0:
        raise _Failed("zero-byte file")
    try:
        container = av.open(result.path, metadata_errors="ignore")
    except Exception as error:
        raise _Failed(f"cannot open container: {error_message(error)}") from None
    with container:
        result.container = container.format.name if container.format else None
        video = first_video_stream(container)
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is not None:
            ctx = video.codec_context
            if ctx is None:
                raise _Failed("no decoder for the video stream")
            result.has_video = True
            result.video_codec = ctx.name
            result.width, result.height = (ctx.width or None), (ctx.height or None)
            result.num_frames = int(video.frames) or None
            rate = video.average_rate or video.guessed_rate
            result.fps = float(rate) if rate else None
            result.duration = _seconds(video.duration, video.time_base)
        if audio is not None:
            ctx = audio.codec_context
            if ctx is None:
                raise _Failed("no decoder for the audio stream")
            result.has_audio = True
            result.audio_codec = ctx.name
            result.sample_rate = int(ctx.sample_rate) or None
            result.channels = int(ctx.channels) or None
            result.audio_duration = _seconds(audio.duration, audio.time_base)
        # streams that state no duration of their own (Matroska/WebM) are checked for truncation
        # against the container's, which is the longest stream's
        unstated = {kind for kind, has, seconds in (("video", result.has_video, result.duration),
                                                    ("audio", result.has_audio, result.audio_duration))
                    if has and seconds is None}
        if result.duration is None and result.has_video and container.duration:
            result.duration = container.duration / 1e6
        if result.audio_duration is None and result.has_audio and container.duration:
            result.audio_duration = container.duration / 1e6
        if not result.has_video:
            result.duration = result.audio_duration
        if check == "header" or (video is None and audio is None):
            return
        container_seconds = container.duration / 1e6 if container.duration else None
        fallback = (result.duration, result.audio_duration)
        if "video" in unstated:  # measured by the scan, not checked against the container's duration
            result.duration = None
        if "audio" in unstated:
            result.audio_duration = None
        _scan(result, container, video, audio, check, start_frames, tail_seconds, deadline, max_seconds)
        if result.duration is None:
            result.duration = fallback[0] if result.has_video else result.audio_duration
        if result.audio_duration is None:
            result.audio_duration = fallback[1]
        if unstated and container_seconds:
            measured = [seconds for seconds in (result.duration if result.has_video else None,
                                                result.audio_duration if result.has_audio else None)
                        if seconds is not None]
            longest = max(measured) if measured else None
            _check_truncated(container_seconds, longest, "media" if len(unstated) > 1 else unstated.pop())


class _StreamEnd:
    """Running first/last presentation time and packet count of a stream."""

    def __init__(self, fallback_duration: float = 0.0):
        self.fallback = fallback_duration  # seconds, for packets that carry no duration
        self.first = None
        self.end = None
        self.packets = 0

    def add(self, packet) -> None:
        if packet.pts is None or packet.time_base is None:
            return
        start = float(packet.pts * packet.time_base)
        stop = start + (float(packet.duration * packet.time_base) if packet.duration else self.fallback)
        self.packets += 1
        self.first = start if self.first is None else min(self.first, start)
        self.end = stop if self.end is None else max(self.end, stop)


def _scan(result, container, video, audio, check, start_frames, tail_seconds, deadline, max_seconds) -> None:
    import av

    for stream in (video, audio):
        if stream is not None:
            stream.codec_context.thread_count = 1  # parallelism is across files
            if check == "full":  # strict: report errors the decoder would otherwise conceal
                stream.codec_context.options = {"err_detect": "explode"}
    streams = [s for s in (video, audio) if s is not None]
    vend, aend = _StreamEnd(1.0 / result.fps if result.fps else 0.0), _StreamEnd()
    video_frames = 0       # decoded at the start (or everywhere, for check="full")
    audio_samples = 0
    gops: List[List] = []  # video packets of the last GOPs, each starting at a keyframe
    where = 0.0

    def decode_error(kind, error):
        return _Failed(f"decode error in the {kind} stream at {where:.1f} s: {error_message(error)}")

    try:
        for count, packet in enumerate(container.demux(*streams)):
            if count % 64 == 0 and time.monotonic() > deadline:
                raise _Failed(f"gave up after {max_seconds:g} s (file too slow to read)")
            if packet.size == 0 and packet.pts is None:
                continue  # the demuxer's end-of-stream marker
            if packet.pts is not None and packet.time_base is not None:
                where = float(packet.pts * packet.time_base)
            if packet.is_corrupt:
                kind = "audio" if packet.stream is audio else "video"
                pos = packet.pos if packet.pos is not None and packet.pos >= 0 else None
                if pos is not None and pos + packet.size >= result.size_bytes:
                    declared = result.audio_duration if packet.stream is audio else result.duration
                    of = f" of {declared:.1f} s" if declared else ""
                    raise _Failed(f"truncated: {kind} data ends at {where:.1f} s{of}")
                raise _Failed(f"corrupt {kind} packet at {where:.1f} s")
            if packet.stream is audio:
                aend.add(packet)
                try:
                    for frame in audio.codec_context.decode(packet):
                        if result.audio_start is None and frame.time is not None:
                            result.audio_start = float(frame.time)
                        audio_samples += frame.samples
                except av.FFmpegError as error:
                    raise decode_error("audio", error) from None
                continue
            vend.add(packet)
            if check == "full" or video_frames < start_frames:
                try:
                    for frame in video.codec_context.decode(packet):
                        if result.video_start is None and frame.time is not None:
                            result.video_start = float(frame.time)
                        video_frames += 1
                except av.FFmpegError as error:
                    raise decode_error("video", error) from None
            if check == "fast":
                if packet.is_keyframe or not gops:
                    gops.append([])
                gops[-1].append(packet)
                # keep just enough GOPs that the newest ones still span the last tail_seconds
                while len(gops) > 1 and vend.end is not None and _gop_start(gops[1]) is not None \
                        and vend.end - _gop_start(gops[1]) >= tail_seconds:
                    gops.pop(0)
    except _Failed:
        raise
    except av.FFmpegError as error:
        raise _Failed(f"cannot read packets after {where:.1f} s: {error_message(error)}") from None

    try:  # flush the decoders: frames they held back are part of the stream too
        if audio is not None:
            for frame in audio.codec_context.decode(None):
                audio_samples += frame.samples
        if video is not None and (check == "full" or video_frames < start_frames):
            for frame in video.codec_context.decode(None):
                if result.video_start is None and frame.time is not None:
                    result.video_start = float(frame.time)
                video_frames += 1
    except av.FFmpegError as error:
        raise _Failed(f"decode error at the end of the file: {error_message(error)}") from None

    if audio is not None:
        if aend.packets == 0:
            raise _Failed("audio stream has no packets")
        if audio_samples == 0:
            raise _Failed("no decodable audio")
        measured = aend.end - aend.first if aend.end is not None else audio_samples / (result.sample_rate or 1)
        _check_truncated(result.audio_duration, measured, "audio")
        result.audio_duration = measured
    if video is not None:
        if vend.packets == 0:
            raise _Failed("video stream has no packets")
        if video_frames == 0:
            raise _Failed("no decodable video frame at the start")
        if check == "fast" and gops:
            _decode_tail(video, [p for gop in gops for p in gop], tail_seconds)
        start = result.video_start if result.video_start is not None else vend.first
        end = vend.end
        if end is not None and (vend.packets > 1 and end <= start):
            end = None
        measured = None if end is None else end - start
        if measured is not None and measured <= 0 and result.fps:
            measured = vend.packets / result.fps
        if measured is not None:
            _check_truncated(result.duration, measured, "video")
            result.duration = measured
        result.num_frames = vend.packets
        if result.duration and result.duration > 0 and not result.fps:
            result.fps = vend.packets / result.duration
    else:
        result.duration = result.audio_duration


def _gop_start(gop) -> Optional[float]:
    times = [float(p.pts * p.time_base) for p in gop if p.pts is not None and p.time_base is not None]
    return min(times) if times else None


def _decode_tail(video, packets, tail_seconds) -> None:
    """Decodes the kept last GOPs of the video from a clean decoder state."""
    import av

    ctx = video.codec_context
    ctx.flush_buffers()
    frames = 0
    where = _gop_start(packets) or 0.0
    try:
        for packet in packets:
            if packet.pts is not None and packet.time_base is not None:
                where = float(packet.pts * packet.time_base)
            frames += len(ctx.decode(packet))
        frames += len(ctx.decode(None))
    except av.FFmpegError as error:
        raise _Failed(f"decode error in the video stream at {where:.1f} s: {error_message(error)}") from None
    if frames == 0:
        raise _Failed(f"no decodable video frame in the last {tail_seconds:g} s")


def _check_truncated(declared: Optional[float], measured: Optional[float], kind: str) -> None:
    """The header promised ``declared`` seconds; the packets stop at ``measured``."""
    if declared is None or measured is None or declared <= 0:
        return
    if measured < declared - max(0.5, 0.05 * declared):
        raise _Failed(f"truncated: {kind} data ends at {measured:.1f} s of {declared:.1f} s")
