"""The PyAV writers of ``avidfast prepare``: audio extraction (WAV/FLAC) and re-encoding (H.264/VP9).

One task per source file (:func:`process_task`, run in a worker process) decodes it once and
feeds every output; each output is written under a temporary name and renamed when complete.
"""
import os
from fractions import Fraction
from typing import Dict, Optional, Tuple

from avidfast.data.prepare.discovery import relative
from avidfast.data.probe import error_message, first_video_stream

AUDIO_RATE = 24000  # Hz, mono, of extracted audio
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def process_task(payload: dict) -> dict:
    """Transcodes and/or extracts the audio of one file; returns what it wrote or {"error": ...}."""
    targets = [t for t in (payload["video"], payload["audio"]) if t]
    temps = {t: _temp_name(t) for t in targets}
    try:
        made = _transcode(payload, temps)
        for target in targets:
            os.replace(temps[target], target)
        return made
    except Exception as error:
        return {"error": error_message(error)}
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.unlink(temp)


def _temp_name(target: str) -> str:
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):  # leftovers of a killed run
        if old.startswith(f".{name}.") and old.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, old))
            except OSError:
                pass
    return os.path.join(directory, f".{name}.{os.getpid()}.tmp")


def _transcode(payload: dict, temps: Dict[str, str]) -> dict:
    import av

    out = payload["out"]
    want_video = payload["video"] is not None
    with av.open(payload["source"], metadata_errors="ignore") as source:
        vin = first_video_stream(source)
        ain = source.streams.audio[0] if source.streams.audio else None
        if vin is None or ain is None:
            raise RuntimeError("the file lost a stream since it was probed")
        for stream in (vin, ain):
            stream.codec_context.thread_count = 1
        t0 = float(payload["video_start"] or 0.0)
        sinks = []
        extracted = None
        if payload["audio"]:
            extracted = _AudioFile(temps[payload["audio"]], payload["audio_format"])
            sinks.append(_Aligned(extracted, av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE),
                                  AUDIO_RATE, t0))
        writer = None
        if want_video:
            writer = _VideoWriter(temps[payload["video"]], payload, vin)
            if writer.audio is not None:
                sinks.append(_Aligned(writer, av.AudioResampler(format="fltp", layout=writer.audio_layout,
                                                                rate=writer.audio_rate), writer.audio_rate, t0))
        streams = [vin, ain] if want_video else [ain]
        try:
            for packet in source.demux(*streams):
                if packet.stream is ain:
                    for frame in ain.codec_context.decode(packet if packet.size else None):
                        for sink in sinks:
                            sink.push(frame)
                elif writer is not None:
                    for frame in vin.codec_context.decode(packet if packet.size else None):
                        writer.add_frame(frame)
            for sink in sinks:
                sink.finish()
            made = {}
            if writer is not None:
                info = writer.close()
                writer = None
                info["path"] = relative(payload["video"], out)
                made["video"] = info
            if extracted is not None:
                made["audio"] = {"path": relative(payload["audio"], out), "duration": extracted.close() / AUDIO_RATE}
                extracted = None
            return made
        finally:
            if writer is not None:
                writer.abort()
            if extracted is not None:
                extracted.abort()


class _Aligned:
    """Resamples decoded audio and shifts it so that output sample 0 is at time ``t0`` (s)."""

    def __init__(self, sink, resampler, rate: int, t0: float):
        self.sink, self.resampler, self.rate, self.t0 = sink, resampler, rate, t0
        self.skip: Optional[int] = None  # samples still to drop (> 0) or silence to add first (< 0)

    def push(self, frame) -> None:
        if self.skip is None:
            start = float(frame.time) if frame.time is not None else self.t0
            self.skip = int(round((self.t0 - start) * self.rate))
        for out in self.resampler.resample(frame):
            self._write(out.to_ndarray())

    def finish(self) -> None:
        for out in self.resampler.resample(None):
            self._write(out.to_ndarray())

    def _write(self, samples) -> None:
        import numpy as np

        if samples.ndim == 1:
            samples = samples[None]
        if self.skip and self.skip < 0:
            self.sink.write_audio(np.zeros((samples.shape[0], -self.skip), samples.dtype))
            self.skip = 0
        if self.skip and self.skip > 0:
            drop = min(self.skip, samples.shape[1])
            samples = samples[:, drop:]
            self.skip -= drop
        if samples.shape[1]:
            self.sink.write_audio(samples)


class _AudioFile:
    """A 24 kHz mono 16-bit WAV (Python's wave) or FLAC (PyAV) being written; counts samples."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind, self.samples = path, kind, 0
        if kind == "wav":
            import wave

            self.file = wave.open(path, "wb")
            self.file.setnchannels(1)
            self.file.setsampwidth(2)
            self.file.setframerate(AUDIO_RATE)
        else:
            import av

            self.file = av.open(path, "w", format="flac")
            self.stream = self.file.add_stream("flac", rate=AUDIO_RATE)
            self.stream.layout = "mono"
            self.stream.format = "s16"

    def write_audio(self, samples) -> None:
        """``samples``: (1, n) int16."""
        import numpy as np

        samples = np.ascontiguousarray(samples.reshape(1, -1), dtype=np.int16)
        if self.kind == "wav":
            self.file.writeframes(samples.tobytes())
        else:
            import av

            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts, frame.time_base = self.samples, Fraction(1, AUDIO_RATE)
            self.file.mux(self.stream.encode(frame))
        self.samples += samples.shape[1]

    def close(self) -> int:
        if self.kind != "wav":
            self.file.mux(self.stream.encode(None))
        self.file.close()
        return self.samples

    def abort(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass


def output_size(width: int, height: int, short_side: Optional[int]) -> Tuple[int, int]:
    """(width, height) in pixels of a re-encoded copy: scaled (never enlarged) so that its short
    side is ``short_side`` (None: the source's size), the aspect ratio kept, both sides even."""
    if short_side is not None and min(width, height) > short_side:
        scale = short_side / min(width, height)
        width, height = (short_side, round(height * scale / 2) * 2) if width <= height else \
            (round(width * scale / 2) * 2, short_side)
    return max(2, width - width % 2), max(2, height - height % 2)


class _VideoWriter:
    """Re-encodes to a constant frame rate with a fixed GOP (and the size of :func:`output_size`),
    plus audio unless it goes to a file."""

    def __init__(self, path: str, payload: dict, vin):
        import av

        kind, self.fps, gop = payload["transcode"], payload["fps"], payload["gop"]
        self.width, self.height = output_size(vin.codec_context.width, vin.codec_context.height,
                                              payload.get("short_side"))
        self.total = max(1, int(round((payload["duration"] or 0.0) * self.fps)))
        self.t0 = float(payload["video_start"] or 0.0)
        if kind == "h264":
            self.container = av.open(path, "w", format="mp4", options={"movflags": "+faststart"})
            self.video = self.container.add_stream("libx264", rate=self.fps)
            # fastdecode (no CABAC, no deblocking) roughly halves the loaders' decode time
            self.video.options = {"preset": "veryfast", "tune": "fastdecode", "crf": "23",
                                  "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        else:
            self.container = av.open(path, "w", format="webm")
            self.video = self.container.add_stream("libvpx-vp9", rate=self.fps)
            self.video.options = {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32", "b:v": "0",
                                  "lag-in-frames": "0", "keyint_min": str(gop)}
        self.video.width, self.video.height = self.width, self.height
        self.video.pix_fmt = "yuv420p"
        self.video.codec_context.gop_size = gop
        self.video.codec_context.thread_count = 1
        self.audio = None
        self.audio_rate = self.audio_layout = None
        if kind == "h264" or not payload["audio"]:
            channels = payload.get("channels") or 1
            self.audio_layout = "mono" if channels == 1 else "stereo"
            rate = payload.get("sample_rate") or 48000
            if kind == "h264":
                self.audio_rate = rate if rate in _AAC_RATES else 48000
                self.audio = self.container.add_stream("aac", rate=self.audio_rate)
            else:
                self.audio_rate = 48000
                self.audio = self.container.add_stream("libopus", rate=self.audio_rate)
            self.audio.layout = self.audio_layout
        self.slot = 0          # next output frame index
        self.previous = None   # last input frame, converted
        self.audio_samples = 0

    def add_frame(self, frame) -> None:
        t = (float(frame.time) if frame.time is not None else self.slot / self.fps) - self.t0
        if self.previous is not None:
            # each output slot k (at k / fps) shows the input frame nearest in time
            while self.slot < self.total and (self.slot + 0.5) / self.fps < t:
                self._emit(self.previous)
        self.previous = frame.reformat(width=self.width, height=self.height, format="yuv420p", interpolation="AREA")

    def _emit(self, frame) -> None:
        frame.pts, frame.time_base = self.slot, Fraction(1, self.fps)
        try:
            frame.pict_type = 0  # let the encoder place keyframes (every gop frames)
        except (AttributeError, TypeError, ValueError):
            pass
        self.container.mux(self.video.encode(frame))
        self.slot += 1

    def write_audio(self, samples) -> None:
        """``samples``: (channels, n) float32 at ``audio_rate``."""
        import av
        import numpy as np

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32), format="fltp",
                                           layout=self.audio_layout)
        frame.sample_rate = self.audio_rate
        frame.pts, frame.time_base = self.audio_samples, Fraction(1, self.audio_rate)
        self.container.mux(self.audio.encode(frame))
        self.audio_samples += samples.shape[1]

    def close(self) -> dict:
        if self.previous is None:
            raise RuntimeError("no video frame could be decoded")
        while self.slot < self.total:
            self._emit(self.previous)
        self.container.mux(self.video.encode(None))
        if self.audio is not None:
            self.container.mux(self.audio.encode(None))
        self.container.close()
        has_audio = self.audio is not None and self.audio_samples > 0
        return {"duration": self.total / self.fps, "fps": float(self.fps), "width": self.width,
                "height": self.height, "sample_rate": self.audio_rate if has_audio else None,
                "channels": (1 if self.audio_layout == "mono" else 2) if has_audio else None}

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass
