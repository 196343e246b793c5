"""A deterministic synthetic audio-visual data set whose picture and sound share a hidden class.

Every clip is a real MP4 file (H.264 yuv420p video + AAC audio) so that it goes through exactly
the same code as downloaded media: ``avidfast prepare``, the PyAV loader, the DALI pipeline.

Class ``c`` fixes
  * the picture: a shape (6 kinds), a motion pattern (5 kinds) and a hue; shape and motion
    together are distinct for the first 30 classes, the hue for all of them, but only a quarter
    of the clips (COLOUR_CUE) are painted in their class's hue, the others in a random one, so
    that colour alone (which even a random network's first layer reads) does not give the class;
  * the sound: a pitch (24 semitone steps over two octaves), a rhythm (steady tone or 2, 3 or
    4 beeps per second) and a timbre (3 harmonic mixes); the pitch alone is distinct for the
    first 24 classes.
Every clip also draws two values of its own that picture and sound share (so that a clip's
sound can be told from the sounds of other clips of its class, as in instance discrimination):
  * the shape's hue <-> the pitch of a soft whistle, 1.5 to 8.5 kHz (``whistle_hz``);
  * the shape's size <-> the loudness of the tone (a bigger shape sounds louder).
A tempo shared by the motion and the rhythm (beeps phase-locked to the motion) is a third, but
the training augmentations (audio offset and duration jitter) blur it. The rest is nuisance of
one stream only: shape position, motion amplitude and phase, background colour, per-frame block
noise, a grey distractor blob, pitch jitter (+-0.3 semitone) and background hiss. The class is
learnable from either stream but not from a single pixel or bin.

Same arguments -> same decoded content (x264 runs single-threaded, which keeps it deterministic).
"""
import colorsys
import json
import os
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

import numpy as np

from avidfast.data.manifest import write_manifest
from avidfast.errors import AvidfastError
from avidfast.files import atomic_write_text

MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "synthetic.json"
_FORMAT_VERSION = 3
COLOUR_CUE = 0.25  # share of clips painted in their class's hue
_SHAPES = ("disc", "square", "diamond", "ring", "cross", "triangle")
_MOTIONS = ("horizontal", "vertical", "circle", "diagonal", "pulse")
_RHYTHMS = (0.0, 2.0, 3.0, 4.0)  # beeps per second at tempo 1 (0: a steady tone)
_TIMBRES = ((1.0,), (1.0, 0.5, 0.33), (1.0, 0.0, 0.45, 0.0, 0.25))  # harmonic amplitudes


WHISTLE_HZ = (1500.0, 8500.0)  # whistle pitch at hue 0 and at hue 1 (log scale between them)


class DatasetError(AvidfastError, ValueError):
    """Bad arguments, or an output folder that already holds a different data set."""


def class_style(label: int) -> Dict[str, object]:
    """The hidden attributes of class ``label`` (what a perfect classifier would recover)."""
    return {
        "shape": _SHAPES[label % 6],
        "motion": _MOTIONS[(label + label // 6) % 5],  # (shape, motion) is injective for label < 30
        "hue": (label * 0.618033988749895) % 1.0,
        "semitone": (label * 7) % 24,  # injective for label < 24
        "rhythm": _RHYTHMS[label % 4],
        "timbre": (label // 4) % 3,
    }


def whistle_hz(hue: float) -> float:
    """Pitch in Hz of the whistle of a clip whose shape has ``hue`` in [0, 1)."""
    low, high = WHISTLE_HZ
    return float(low * (high / low) ** hue)


def _params(num_videos, num_classes, seconds, seed, size, fps, sample_rate, colour_cue,
            silent_fraction) -> Dict[str, object]:
    params = {
        "generator": "avidfast.data.synthetic", "version": _FORMAT_VERSION,
        "num_videos": int(num_videos), "num_classes": int(num_classes), "seconds": float(seconds),
        "seed": int(seed), "size": [int(size[0]), int(size[1])], "fps": int(fps),
        "sample_rate": int(sample_rate), "colour_cue": float(colour_cue),
    }
    if silent_fraction:  # only recorded when used, so sets made before the option keep their parameters
        params["silent_fraction"] = float(silent_fraction)
    return params


def silent_rows(num_videos: int, silent_fraction: float, seed: int) -> List[int]:
    """The manifest rows written without an audio stream: ``round(silent_fraction * num_videos)`` rows
    drawn without replacement with a generator seeded by ``seed``, sorted."""
    count = int(round(silent_fraction * num_videos))
    rows = np.random.default_rng([seed, 0x51E7]).permutation(num_videos)[:count]
    return sorted(int(r) for r in rows)


def _check(num_videos, num_classes, seconds, size, fps, sample_rate, colour_cue, silent_fraction=0.0) -> None:
    if not 0.0 <= float(silent_fraction) <= 1.0:
        raise DatasetError(f"silent_fraction must be between 0 and 1, got {silent_fraction}")
    if int(num_videos) < 1:
        raise DatasetError(f"num_videos must be at least 1, got {num_videos}")
    if not 1 <= int(num_classes) <= int(num_videos):
        raise DatasetError(f"num_classes must be between 1 and num_videos ({num_videos}), got {num_classes}")
    if int(fps) < 1:
        raise DatasetError(f"fps must be a positive integer, got {fps}")
    if not seconds > 0 or round(seconds * fps) < 1:
        raise DatasetError(f"seconds must give at least one frame at {fps} fps, got {seconds}")
    if len(size) != 2 or any(int(s) < 16 or int(s) % 2 for s in size):
        raise DatasetError(f"size must be (width, height), both even and at least 16, got {tuple(size)}")
    if not 0.0 <= float(colour_cue) <= 1.0:
        raise DatasetError(f"colour_cue must be between 0 and 1, got {colour_cue}")
    if not 8000 <= int(sample_rate) <= 96000:
        raise DatasetError(f"sample_rate must be between 8000 and 96000 Hz, got {sample_rate}")


def make_dataset(out_dir: str, num_videos: int, num_classes: int, seconds: float = 4.0, seed: int = 0, *,
                 size: Tuple[int, int] = (128, 128), fps: int = 16, sample_rate: int = 24000,
                 colour_cue: float = COLOUR_CUE, silent_fraction: float = 0.0, workers: Optional[int] = None,
                 progress: bool = False) -> str:
    """Writes ``num_videos`` labelled clips and their manifest under ``out_dir``; returns the manifest path.

    Files: ``out_dir/videos/class_XX/clip_XXXXX.mp4`` (H.264 yuv420p, ``size`` = (width, height)
    pixels, ``fps`` frames per second, ``round(seconds * fps)`` frames; AAC mono at
    ``sample_rate`` Hz, ``seconds`` long), ``out_dir/manifest.csv`` (columns ``path,label``;
    paths relative to ``out_dir``; labels are integers 0..num_classes-1, balanced, shuffled) and
    ``out_dir/synthetic.json`` (the arguments). Every file is written atomically.

    ``colour_cue`` is the share of clips painted in their class's hue (the others get a random
    hue): 0 leaves colour no information about the class. ``silent_fraction``: the share of clips
    written without an audio stream (the rows of :func:`silent_rows`; many UCF-101 and HMDB-51
    videos have none), to exercise the video-only evaluation. ``workers`` spawned processes encode
    in parallel (default: up to 4, by CPU count, when there are 16 clips or more; 1: in this
    process); the content does not depend on it. ``progress``
    shows a tqdm bar. Running it again with the same arguments rewrites only missing clips. A
    folder that already holds a manifest made otherwise (other arguments, or not by this
    function) is refused with :class:`DatasetError`, so a user's data set is never overwritten.
    """
    _check(num_videos, num_classes, seconds, size, fps, sample_rate, colour_cue, silent_fraction)
    params = _params(num_videos, num_classes, seconds, seed, size, fps, sample_rate, colour_cue, silent_fraction)
    silent = set(silent_rows(num_videos, silent_fraction, seed))
    out_dir = os.path.abspath(out_dir)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    params_path = os.path.join(out_dir, PARAMS_NAME)
    previous = _read_json(params_path)
    same = previous == params
    if os.path.exists(manifest_path) and not same:
        if previous is None:
            why = "that was not made by make_dataset"
        else:
            diff = [f"{k}={previous.get(k)!r}" for k in params if previous.get(k) != params[k]]
            why = f"made with other arguments ({', '.join(diff)})"
        raise DatasetError(f"{out_dir} already holds a {MANIFEST_NAME} {why}; choose another folder or delete it")
    if os.path.exists(params_path) and not same:
        os.unlink(params_path)  # from an interrupted run with other arguments: its clips get rewritten

    labels = np.random.default_rng([seed, 0x5EED]).permutation(np.arange(num_videos) % num_classes)
    digits = max(2, len(str(num_classes - 1)))
    rows: List[Dict[str, object]] = []
    todo = []
    for i, label in enumerate(labels.tolist()):
        rel = f"videos/class_{label:0{digits}d}/clip_{i:05d}.mp4"
        rows.append({"path": rel, "label": label})
        # A final name exists only once complete (atomic writes); under our own synthetic.json it
        # was made with these arguments. Without one, everything is rewritten.
        if not (same and os.path.isfile(os.path.join(out_dir, rel))):
            todo.append((i, label, rel))

    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(todo) >= 16 else 1
    jobs = [(os.path.join(out_dir, rel), label, i, params, i in silent) for i, label, rel in todo]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="synthetic clips", unit="clip")
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _make_clip(job)
            if bar is not None:
                bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(_make_clip, jobs, chunksize=4):
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    write_manifest(manifest_path, rows, columns=["path", "label"])
    atomic_write_text(params_path, json.dumps(params, indent=2) + "\n")
    return manifest_path


def _make_clip(job) -> None:
    path, label, index, params, silent = job
    rng = np.random.default_rng([params["seed"], index])
    video, audio = render_clip(label, rng, params["seconds"], tuple(params["size"]), params["fps"], params["sample_rate"],
                               params["colour_cue"])
    _write_mp4(path, video, None if silent else audio, params["fps"], params["sample_rate"])


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def render_clip(label: int, rng: np.random.Generator, seconds: float, size: Tuple[int, int], fps: int,
                sample_rate: int, colour_cue: float = COLOUR_CUE) -> Tuple[np.ndarray, np.ndarray]:
    """Renders one clip of class ``label``; with probability ``colour_cue`` the shape has its
    class's hue, otherwise a random one.

    Returns ``video`` (T, H, W, 3) uint8 RGB with T = round(seconds * fps), (W, H) = size, and
    ``audio`` (S,) float32 in [-1, 1] with S = round(seconds * sample_rate).
    """
    style = class_style(label)
    width, height = size
    frames = int(round(seconds * fps))
    tempo = rng.uniform(0.75, 1.33)
    t = np.arange(frames) / fps  # (T,) seconds

    # --- picture ---
    side = min(width, height)
    size = rng.random()  # shared: the shape's radius and the tone's loudness
    radius = (0.15 + 0.10 * size) * side
    amp = rng.uniform(0.08, 0.15) * side
    phase = rng.uniform(0, 2 * np.pi)
    omega = 2 * np.pi * 0.5 * tempo  # one motion cycle every 2 s at tempo 1
    margin = radius + amp
    cx0 = rng.uniform(margin, width - margin) if width > 2 * margin else width / 2
    cy0 = rng.uniform(margin, height - margin) if height > 2 * margin else height / 2
    s = np.sin(omega * t + phase)
    c = np.cos(omega * t + phase)
    r = np.full(frames, radius)
    motion = style["motion"]
    if motion == "horizontal":
        cx, cy = cx0 + amp * s, np.full(frames, cy0)
    elif motion == "vertical":
        cx, cy = np.full(frames, cx0), cy0 + amp * s
    elif motion == "circle":
        cx, cy = cx0 + amp * c, cy0 + amp * s
    elif motion == "diagonal":  # a bounce (triangle wave) along the diagonal
        tri = 2 / np.pi * np.arcsin(s)
        cx, cy = cx0 + amp * tri, cy0 + amp * tri
    else:  # "pulse": stays put, breathes
        cx, cy = np.full(frames, cx0), np.full(frames, cy0)
        r = radius * (1 + 0.35 * s)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dx = xx[None] - cx[:, None, None].astype(np.float32)  # (T, H, W)
    dy = yy[None] - cy[:, None, None].astype(np.float32)
    rr = r[:, None, None].astype(np.float32)
    mask = _shape_mask(style["shape"], dx, dy, rr)

    own_colour = rng.random() < colour_cue
    hue = ((style["hue"] if own_colour else rng.random()) + rng.uniform(-0.03, 0.03)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))) * 255
    background = rng.uniform(0, 70, size=3)
    noise = rng.uniform(4, 12)
    video = np.empty((frames, height, width, 3), np.int16)
    video[:] = background.astype(np.int16)
    if rng.random() < 0.5:  # a class-agnostic grey distractor drifting around
        bx = rng.uniform(0, width) + np.cumsum(rng.normal(0, 1.5, frames))
        by = rng.uniform(0, height) + np.cumsum(rng.normal(0, 1.5, frames))
        blob = (np.abs(xx[None] - bx[:, None, None] % width) < side * 0.06) & \
               (np.abs(yy[None] - by[:, None, None] % height) < side * 0.06)
        video[blob] = int(rng.uniform(90, 160))
    video[mask] = colour.astype(np.int16)
    # grey pixel noise in small blocks (cheap to render and to encode, survives x264's quantiser)
    block = max(2, side // 32)
    grain = rng.standard_normal((frames, -(-height // block), -(-width // block), 1), dtype=np.float32)
    grain = (noise * grain).round().astype(np.int16)
    video += np.repeat(np.repeat(grain, block, axis=1), block, axis=2)[:, :height, :width]
    video = np.clip(video, 0, 255, out=video).astype(np.uint8)

    # --- sound ---
    n = int(round(seconds * sample_rate))
    ts = np.arange(n) / sample_rate
    f0 = 220.0 * 2 ** ((style["semitone"] + rng.uniform(-0.3, 0.3)) / 12)
    tone = np.zeros(n)
    for k, a in enumerate(_TIMBRES[style["timbre"]], start=1):
        if a and k * f0 < sample_rate / 2:
            tone += a * np.sin(2 * np.pi * k * f0 * ts + rng.uniform(0, 2 * np.pi))
    tone /= np.abs(tone).max() + 1e-9
    if whistle_hz(hue) < sample_rate / 2:
        tone += 0.3 * np.sin(2 * np.pi * whistle_hz(hue) * ts + rng.uniform(0, 2 * np.pi))
    if style["rhythm"]:
        rate = style["rhythm"] * tempo
        # beeps: smooth on/off gating, on for 45 % of each beat, phase-locked to the motion
        beat = (rate * ts + phase / (2 * np.pi)) % 1.0
        envelope = np.clip(np.minimum(beat, 0.45 - beat) * 40, 0, 1)
    else:
        envelope = np.ones(n)
    loudness = 0.15 + 0.35 * size
    audio = loudness * tone * envelope + rng.uniform(0.01, 0.04) * rng.standard_normal(n)
    return video, np.clip(audio, -1, 1).astype(np.float32)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean (T, H, W) mask of a shape of radius ``r`` (T, 1, 1) at offsets (dx, dy) (T, H, W)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "disc":
        return dx * dx + dy * dy < r * r
    if shape == "square":
        return np.maximum(ax, ay) < r * 0.85
    if shape == "diamond":
        return ax + ay < r * 1.2
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if shape == "cross":
        return ((ax < r * 0.3) & (ay < r)) | ((ay < r * 0.3) & (ax < r))
    # triangle, apex up
    return (dy > -r) & (dy < r * 0.8) & (ax < (dy + r) * 0.6)


def _write_mp4(path: str, video: np.ndarray, audio: Optional[np.ndarray], fps: int, sample_rate: int) -> None:
    """Encodes (T, H, W, 3) uint8 frames and (S,) float32 mono samples (None: no audio stream) into an
    MP4, atomically."""
    import av

    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with av.open(tmp, "w", format="mp4") as container:
            vs = container.add_stream("libx264", rate=fps)
            vs.width, vs.height = video.shape[2], video.shape[1]
            vs.pix_fmt = "yuv420p"
            vs.codec_context.thread_count = 1  # single-threaded x264 is bit-exact run to run
            vs.options = {"preset": "ultrafast", "crf": "23"}
            aus = None
            if audio is not None:
                aus = container.add_stream("aac", rate=sample_rate)
                aus.layout = "mono"
                aus.options = {"aac_coder": "fast"}
            for i, image in enumerate(video):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, fps)
                container.mux(vs.encode(frame))
            container.mux(vs.encode(None))
            if aus is not None:
                chunk = 1024
                for start in range(0, len(audio), chunk):
                    frame = av.AudioFrame.from_ndarray(audio[None, start:start + chunk], format="flt", layout="mono")
                    frame.sample_rate = sample_rate
                    frame.pts = start
                    frame.time_base = Fraction(1, sample_rate)
                    container.mux(aus.encode(frame))
                container.mux(aus.encode(None))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
