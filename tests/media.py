"""Test media: small deterministic clips, every kind of bad input, and a few real clips.

Import from tests as ``from media import make_clip, make_bad_media, real_clips`` (pytest puts the
tests folder on ``sys.path`` because it has a conftest.py and no __init__.py).

Real media: Big Buck Bunny (H.264 720p + AAC, from MoviePy's documentation, shipped in its sdist)
lives in a cache folder, ``$AVIDFAST_MEDIA_CACHE`` or ``~/.cache/avidfast/media``. ``python
scripts/fetch_media.py`` downloads and cuts it; :func:`real_clips` only uses what is already there
(no network in tests) and returns ``None`` when it is missing.
"""
import csv
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from fractions import Fraction
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

MOVIEPY_VERSION = "2.2.1"
_SDIST = f"moviepy-{MOVIEPY_VERSION}.tar.gz"
_ZIP_IN_SDIST = "moviepy_10_minutes.zip"  # under docs/_static/medias/getting_started/
_BBB_IN_ZIP = "resources/bbb.mp4"

VIDEO_CODECS = {"h264": "libx264", "vp9": "libvpx-vp9", "mpeg4": "mpeg4", "mjpeg": "mjpeg", "mpeg2": "mpeg2video",
                "theora": "libtheora", "vp8": "libvpx"}
# audio codec by container (extension); AAC elsewhere
AUDIO_CODECS = {".webm": "libopus", ".mpeg": "mp2", ".mpg": "mp2", ".ogg": "vorbis", ".ogv": "vorbis",
                ".wav": "pcm_s16le"}
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def make_clip(path: str, seconds: float = 2.0, fps: int = 16, size: Tuple[int, int] = (64, 48),
              sample_rate: int = 24000, channels: int = 1, codec: str = "h264", audio: bool = True,
              video: bool = True, seed: int = 0, frame_times: Optional[Sequence[float]] = None,
              faststart: bool = False) -> str:
    """Writes a small clip of deterministic, random-looking content; returns ``path``.

    ``size`` is (width, height) in pixels (odd sizes use yuv444p with H.264, which allows them);
    ``codec`` is a key of :data:`VIDEO_CODECS`; the container comes from the extension, and the
    audio codec too (:data:`AUDIO_CODECS`: .webm gets Opus, .mpeg MP2, .ogg Vorbis, .wav PCM,
    others AAC). Raises ValueError when this PyAV build lacks the encoder. ``frame_times`` (seconds, increasing) gives a variable frame rate
    and overrides ``fps`` and ``seconds`` for the video. ``faststart`` puts an MP4's index first.
    """
    import av

    rng = np.random.default_rng(seed)
    width, height = size
    ext = os.path.splitext(path)[1].lower()
    options = {"movflags": "+faststart"} if faststart and ext in (".mp4", ".m4v", ".mov", ".m4a") else {}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w", options=options) as container:
        vs = None
        if video:
            vs = container.add_stream(VIDEO_CODECS[codec], rate=fps)
            vs.width, vs.height = width, height
            odd = width % 2 or height % 2
            vs.pix_fmt = {"mjpeg": "yuvj420p"}.get(codec, "yuv444p" if odd and codec == "h264" else "yuv420p")
            vs.codec_context.thread_count = 1
            if codec == "h264":
                vs.options = {"preset": "ultrafast"}
            elif codec == "vp9":
                vs.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
            if frame_times is not None:
                vs.codec_context.time_base = Fraction(1, 1000)
                vs.time_base = Fraction(1, 1000)
        aus = None
        if audio:
            aus = container.add_stream(AUDIO_CODECS.get(ext, "aac"), rate=sample_rate)
            aus.layout = _LAYOUTS[channels]
            if aus.codec_context.name == "vorbis":
                aus.codec_context.options = {"strict": "experimental"}  # FFmpeg's own Vorbis encoder
            resample = av.AudioResampler(format=aus.codec_context.codec.audio_formats[0].name,
                                         layout=_LAYOUTS[channels], rate=sample_rate)
        if vs is not None:
            times = list(frame_times) if frame_times is not None else [i / fps for i in range(round(seconds * fps))]
            yy, xx = np.mgrid[0:height, 0:width]
            for i, t in enumerate(times):
                image = np.empty((height, width, 3), np.uint8)
                image[..., 0] = (xx * 4 + i * 8) % 256
                image[..., 1] = (yy * 4 + i * 3) % 256
                image[..., 2] = rng.integers(0, 256, (height, width), dtype=np.uint8) // 4 + 96
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                if frame_times is not None:
                    frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
                else:
                    frame.pts, frame.time_base = i, Fraction(1, fps)
                container.mux(vs.encode(frame))
            container.mux(vs.encode(None))
        if aus is not None:
            n = int(round(seconds * sample_rate))
            t = np.arange(n) / sample_rate
            pitch = 300 + 50 * (seed % 7)
            samples = np.stack([0.3 * np.sin(2 * np.pi * pitch * (c + 1) * t) for c in range(channels)])
            samples += 0.02 * rng.standard_normal(samples.shape)
            samples = samples.astype(np.float32)
            chunk = 960
            for start in range(0, n, chunk):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + chunk]),
                                                   format="fltp", layout=_LAYOUTS[channels])
                frame.sample_rate = sample_rate
                frame.pts, frame.time_base = start, Fraction(1, sample_rate)
                for converted in resample.resample(frame):
                    container.mux(aus.encode(converted))
            for converted in resample.resample(None):
                container.mux(aus.encode(converted))
            container.mux(aus.encode(None))
    return path


def encoder_available(name: str) -> bool:
    """True when this PyAV build can encode with ``name`` (a key of VIDEO_CODECS or an FFmpeg encoder)."""
    import av

    try:
        av.codec.Codec(VIDEO_CODECS.get(name, name), "w")
        return True
    except ValueError:
        return False


def make_mixed_media(directory: str) -> Dict[str, Optional[str]]:
    """A folder as a new user has it: real clips in the containers data sets ship, and files that
    are not clips. Returns file name -> expected reason prefix (None: kept).

    hello.mpeg: MPEG-2 video + MP2 audio in MPEG-PS; hello.ogg: Theora (VP8 where this PyAV has
    no Theora encoder) + Vorbis in Ogg; hello.ts: H.264 + AAC in MPEG-TS; long_audio.webm: VP9 +
    Opus whose audio (4 s) outlasts its video (2 s); sound.wav: audio only; notes.txt: text;
    sub/cut.mp4: an MP4 cut in half; picture.png: a still image.
    """
    import av

    os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
    p = lambda name: os.path.join(directory, name)  # noqa: E731
    make_clip(p("hello.mpeg"), seconds=2.5, fps=25, codec="mpeg2", sample_rate=44100, channels=2, seed=21)
    make_clip(p("hello.ogg"), seconds=2.5, codec="theora" if encoder_available("theora") else "vp8",
              sample_rate=48000, channels=2, seed=22)
    make_clip(p("hello.ts"), seconds=2.5, seed=23)
    make_clip(p("long_audio.webm"), seconds=4.0, codec="vp9", sample_rate=48000,
              frame_times=[i / 16 for i in range(32)], seed=24)
    make_clip(p("sound.wav"), seconds=2.5, video=False, seed=25)
    with open(p("notes.txt"), "w") as f:
        f.write("shot on a phone, 2024\n")
    full = make_clip(p("full.tmp.mp4"), seconds=2.5, seed=26)
    with open(full, "rb") as f:
        data = f.read()
    os.unlink(full)
    with open(p("sub/cut.mp4"), "wb") as f:
        f.write(data[: len(data) // 2])
    with av.open(p("picture.png"), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    return {"hello.mpeg": None, "hello.ogg": None, "hello.ts": None, "long_audio.webm": None,
            "sound.wav": "audio only", "notes.txt": "not a media file", "sub/cut.mp4": "cannot open container",
            "picture.png": "a still image"}


# Bad (and odd but fine) inputs: kind -> (file name, expected reject reason prefix or None = kept).
# With min_seconds=1.0.
BAD_MEDIA_EXPECTED: Dict[str, Optional[str]] = {
    "zero_byte": "zero-byte file",
    "truncated": "cannot open container",
    "truncated_faststart": "truncated: ",
    "no_audio": "no audio stream",
    "no_video": "no video stream",
    "not_media": "cannot open container",
    "too_short": "shorter than 1 s (0.5 s)",
    "mid_stream_corruption": "decode error in the",
    "multichannel": None,
    "odd_rate": None,
    "vfr": None,
    "odd_size": None,
    "vp9_webm": None,
    "mpeg4_mkv": None,
}


def make_bad_media(directory: str) -> Dict[str, str]:
    """Creates one file of every kind of :data:`BAD_MEDIA_EXPECTED` in ``directory``; kind -> path.

    zero_byte: empty .mp4; truncated: a valid MP4 (index at the end) cut in half;
    truncated_faststart: same with the index first (the header promises more than the data);
    no_audio / no_video: one stream only (no_video is an .m4a); not_media: text named .mp4;
    too_short: 0.5 s; mid_stream_corruption: 3 s MP4 whose middle fifth is overwritten with random
    bytes (the start decodes, later packets do not); multichannel: 6-channel 44.1 kHz audio;
    odd_rate: 11025 Hz stereo; vfr: irregular frame times (average about 17 fps); odd_size:
    97x61 pixels; vp9_webm: VP9 + Opus in WebM; mpeg4_mkv: MPEG-4 part 2 + AAC in Matroska.
    """
    os.makedirs(directory, exist_ok=True)
    p = lambda name: os.path.join(directory, name)  # noqa: E731
    out = {}
    open(p("zero_byte.mp4"), "wb").close()
    out["zero_byte"] = p("zero_byte.mp4")

    full = make_clip(p("full.tmp.mp4"), seconds=2.0, seed=1)
    with open(full, "rb") as f:
        data = f.read()
    os.unlink(full)
    with open(p("truncated.mp4"), "wb") as f:
        f.write(data[: len(data) // 2])
    out["truncated"] = p("truncated.mp4")

    full = make_clip(p("full.tmp.mp4"), seconds=3.0, seed=2, faststart=True)
    with open(full, "rb") as f:
        data = f.read()
    os.unlink(full)
    with open(p("truncated_faststart.mp4"), "wb") as f:
        f.write(data[: len(data) // 2])
    out["truncated_faststart"] = p("truncated_faststart.mp4")

    out["no_audio"] = make_clip(p("no_audio.mp4"), seconds=2.0, audio=False, seed=3)
    out["no_video"] = make_clip(p("no_video.m4a"), seconds=2.0, video=False, seed=4)
    with open(p("not_media.mp4"), "w") as f:
        f.write("This is not a video, just some text with a video extension.\n" * 20)
    out["not_media"] = p("not_media.mp4")
    out["too_short"] = make_clip(p("too_short.mp4"), seconds=0.5, seed=5)

    good = make_clip(p("corrupt.tmp.mp4"), seconds=3.0, seed=6)
    with open(good, "rb") as f:
        data = bytearray(f.read())
    os.unlink(good)
    start, stop = int(len(data) * 0.4), int(len(data) * 0.6)
    data[start:stop] = np.random.default_rng(0).integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    with open(p("mid_stream_corruption.mp4"), "wb") as f:
        f.write(bytes(data))
    out["mid_stream_corruption"] = p("mid_stream_corruption.mp4")

    out["multichannel"] = make_clip(p("multichannel.mp4"), seconds=2.0, sample_rate=44100, channels=6, seed=7)
    out["odd_rate"] = make_clip(p("odd_rate.mov"), seconds=2.0, sample_rate=11025, channels=2, seed=8)
    steps = np.random.default_rng(9).choice([0.02, 0.04, 0.1, 0.25], size=40)
    times = np.concatenate([[0.0], np.cumsum(steps)[:-1]])
    times = times * (2.3 / times[-1])  # 40 frames over 2.3 s, irregularly spaced
    out["vfr"] = make_clip(p("vfr.mp4"), seconds=2.4, frame_times=times.tolist(), seed=9)
    out["odd_size"] = make_clip(p("odd_size.mp4"), seconds=2.0, size=(97, 61), seed=10)
    out["vp9_webm"] = make_clip(p("vp9.webm"), seconds=2.0, codec="vp9", sample_rate=48000, seed=11)
    out["mpeg4_mkv"] = make_clip(p("mpeg4.mkv"), seconds=2.0, codec="mpeg4", seed=12)
    return out


# ----------------------------------------------------------------------------- real media


def media_cache() -> str:
    """The real-media cache folder: ``$AVIDFAST_MEDIA_CACHE`` or ``~/.cache/avidfast/media``."""
    return os.environ.get("AVIDFAST_MEDIA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "avidfast", "media")


def fetch_sdist(cache: str, download: bool = True, timeout: float = 600) -> Optional[str]:
    """MoviePy's sdist in ``cache`` (downloaded with pip when missing and ``download``), or None."""
    path = os.path.join(cache, _SDIST)
    if os.path.isfile(path):
        return path
    if not download:
        return None
    os.makedirs(cache, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"moviepy=={MOVIEPY_VERSION}", "-d", cache]
    try:
        subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if os.path.isfile(path) else None


def extract_bbb(cache: str, sdist: str) -> str:
    """Extracts Big Buck Bunny (596 s, H.264 720p + AAC) from the sdist to ``cache/bbb.mp4``."""
    target = os.path.join(cache, "bbb.mp4")
    if os.path.isfile(target):
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        zip_path = os.path.join(tmp, "docs.zip")
        with tarfile.open(sdist, "r:gz") as tar:
            member = next((m for m in tar if m.isfile() and m.name.endswith("/" + _ZIP_IN_SDIST)), None)
            if member is None:
                raise FileNotFoundError(f"{sdist} has no {_ZIP_IN_SDIST}")
            with tar.extractfile(member) as src, open(zip_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        with zipfile.ZipFile(zip_path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(_BBB_IN_ZIP)), None)
            if name is None:
                raise FileNotFoundError(f"{_ZIP_IN_SDIST} has no {_BBB_IN_ZIP}")
            partial = os.path.join(tmp, "bbb.mp4")
            with archive.open(name) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    return target


def cut_clips(source: str, out_dir: str, count: int, seconds: float = 10.0) -> str:
    """Cuts ``count`` clips of about ``seconds`` each, evenly spaced, by stream copy (no re-encode).

    Each clip starts at a keyframe at or before its nominal start. Writes ``out_dir/clip_XX.mp4``
    and ``out_dir/manifest.csv`` (column ``path``, relative); returns the manifest path.
    """
    import av

    os.makedirs(out_dir, exist_ok=True)
    with av.open(source) as probe:
        total = probe.duration / 1e6
    names = []
    for k in range(count):
        name = f"clip_{k:02d}.mp4"
        names.append(name)
        target = os.path.join(out_dir, name)
        if os.path.isfile(target):
            continue
        start = (k + 0.5) * total / count - seconds / 2
        tmp = target + ".tmp"
        _copy_segment(source, tmp, max(0.0, start), seconds)
        os.replace(tmp, target)
    manifest = os.path.join(out_dir, "manifest.csv")
    with open(manifest + ".tmp", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path"])
        writer.writerows([n] for n in names)
    os.replace(manifest + ".tmp", manifest)
    return manifest


def _copy_segment(source: str, target: str, start: float, seconds: float) -> None:
    import av

    with av.open(source) as inp, av.open(target, "w", format="mp4") as out:
        vin, ain = inp.streams.video[0], inp.streams.audio[0]
        vout = out.add_stream_from_template(vin)
        aout = out.add_stream_from_template(ain)
        inp.seek(int(start / vin.time_base), stream=vin, backward=True, any_frame=False)
        origin = None  # seconds: the keyframe the clip starts at
        for packet in inp.demux(vin, ain):
            if packet.pts is None or packet.dts is None:
                continue
            t = float(packet.pts * packet.time_base)
            if origin is None:
                if packet.stream is not vin or not packet.is_keyframe:
                    continue
                origin = t
            if t < origin:
                continue
            if t >= origin + seconds:
                if packet.stream is vin:
                    break
                continue
            shift = int(round(origin / packet.time_base))
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = vout if packet.stream is vin else aout
            out.mux(packet)


def real_clips(n: int = 3, seconds: float = 10.0, download: bool = False) -> Optional[str]:
    """Manifest of ``n`` real clips cut from Big Buck Bunny in the cache, or None if unavailable.

    Without ``download`` this never touches the network: it needs the sdist (or bbb.mp4) already
    in the cache (``python scripts/fetch_media.py`` puts it there).
    """
    cache = media_cache()
    clips_dir = os.path.join(cache, f"bbb_clips_{n}x{seconds:g}s")
    manifest = os.path.join(clips_dir, "manifest.csv")
    if os.path.isfile(manifest) and all(
            os.path.isfile(os.path.join(clips_dir, f"clip_{k:02d}.mp4")) for k in range(n)):
        return manifest
    try:
        bbb = os.path.join(cache, "bbb.mp4")
        if not os.path.isfile(bbb):
            sdist = fetch_sdist(cache, download=download)
            if sdist is None:
                return None
            bbb = extract_bbb(cache, sdist)
        return cut_clips(bbb, clips_dir, n, seconds)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as error:
        print(f"real media unavailable: {error}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- helpers for tests


def tree_snapshot(directory: str) -> Dict[str, Tuple[int, int, str]]:
    """Relative path -> (size, mtime_ns, sha1) of every file under ``directory``."""
    import hashlib

    snapshot = {}
    for folder, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            with open(path, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            snapshot[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns, digest)
    return snapshot


def sleep_task(payload: dict) -> dict:
    """A worker task that takes ``payload["seconds"]`` (for pool timeout tests)."""
    import time

    time.sleep(payload["seconds"])
    return {"slept": payload["seconds"]}


def crash_task(payload: dict) -> dict:
    """A worker task that kills its process (for pool crash tests)."""
    os._exit(3)
