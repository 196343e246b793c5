"""The synthetic data set: real, decodable MP4 clips whose picture and sound carry the class."""
import colorsys
import json
import os

import numpy as np
import pytest

from avidfast.cli import main
from avidfast.data.manifest import read_manifest
from avidfast.data.probe import probe, reject_reason
from avidfast.data.synthetic import DatasetError, class_style, make_dataset

SMALL = dict(seconds=1.5, size=(64, 48), fps=16, sample_rate=24000)


def decode(path):
    """(T, H, W, 3) uint8 frames and (S,) float32 mono samples of a file."""
    import av

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(path) as container:
        audio = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    return np.stack(frames), np.concatenate(audio)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return make_dataset(str(out), 6, 3, seed=5, **SMALL)


def test_clips_are_real_media_with_the_requested_shape(small_set):
    manifest = read_manifest(small_set)
    assert manifest.columns == ["path", "label"]
    assert len(manifest) == 6
    assert sorted(manifest.label_indices()) == [0, 0, 1, 1, 2, 2]  # balanced
    for i, row in enumerate(manifest.rows):
        assert row["path"].startswith(f"videos/class_{int(row['label']):02d}/clip_")
        result = probe(manifest.path(i), check="full")
        assert reject_reason(result, 1.0) is None, result
        assert (result.video_codec, result.audio_codec) == ("h264", "aac")
        assert (result.width, result.height, result.fps) == (64, 48, 16.0)
        assert result.num_frames == 24
        assert result.duration == pytest.approx(1.5, abs=1e-6)
        assert (result.sample_rate, result.channels) == (24000, 1)
        assert result.audio_duration == pytest.approx(1.5, abs=0.1)
        frames, audio = decode(manifest.path(i))
        assert frames.shape == (24, 48, 64, 3)
        assert abs(len(audio) - 36000) < 2048
    params = json.load(open(os.path.join(os.path.dirname(small_set), "synthetic.json")))
    assert params["num_videos"] == 6 and params["size"] == [64, 48]


def _dominant_hue(frames):
    rgb = frames.reshape(-1, 3).astype(np.int32)
    top, bottom = rgb.max(1), rgb.min(1)
    shape = (top >= 150) & (top - bottom >= 80)  # the saturated, bright shape; not background or distractor
    assert shape.mean() > 0.005
    r, g, b = rgb[shape].mean(0) / 255
    return colorsys.rgb_to_hsv(r, g, b)[0]


def _peak_hz(audio, rate=24000):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)]


def test_picture_and_sound_carry_the_class(small_set):
    manifest = read_manifest(small_set)
    pitches = {}
    for i, label in enumerate(manifest.label_indices()):
        frames, audio = decode(manifest.path(i))
        style = class_style(label)
        _dominant_hue(frames)  # a bright, saturated shape is on screen
        f0 = 220.0 * 2 ** (style["semitone"] / 12)
        peak = _peak_hz(audio)
        # the strongest partial is the fundamental or, for richer timbres, a low harmonic of it
        assert min(abs(peak / (k * f0) - 1) for k in (1, 2, 3)) < 0.03, (label, peak, f0)
        pitches.setdefault(label, []).append(peak)
    assert len({round(np.mean(p), -1) for p in pitches.values()}) == 3  # classes sound different


def test_colour_is_only_a_weak_cue():
    from avidfast.data.synthetic import COLOUR_CUE, render_clip

    own = 0
    for k in range(40):
        frames, _ = render_clip(2, np.random.default_rng(k), 0.25, (48, 48), 16, 8000)
        hue = _dominant_hue(frames)
        own += min(abs(hue - class_style(2)["hue"]), 1 - abs(hue - class_style(2)["hue"])) < 0.07
    # about COLOUR_CUE of the clips (plus the random hues that land near it by chance)
    assert COLOUR_CUE * 40 * 0.3 <= own <= 40 * (COLOUR_CUE + 0.14) + 6


def test_class_styles_are_distinct():
    visual = {(s["shape"], s["motion"]) for s in map(class_style, range(30))}
    audio = {s["semitone"] for s in map(class_style, range(24))}
    assert len(visual) == 30 and len(audio) == 24


def test_same_seed_same_content_other_seed_other_content(tmp_path):
    a = read_manifest(make_dataset(str(tmp_path / "a"), 2, 2, seed=7, **SMALL))
    b = read_manifest(make_dataset(str(tmp_path / "b"), 2, 2, seed=7, **SMALL))
    c = read_manifest(make_dataset(str(tmp_path / "c"), 2, 2, seed=8, **SMALL))
    assert a.rows == b.rows
    for i in range(2):
        va, aa = decode(a.path(i))
        vb, ab = decode(b.path(i))
        assert np.array_equal(va, vb) and np.array_equal(aa, ab)
    vc, ac = decode(c.path(0))
    va, aa = decode(a.path(0))
    assert not np.array_equal(va, vc)


def test_rerun_reuses_and_refuses_a_different_data_set(tmp_path):
    out = str(tmp_path / "set")
    path = make_dataset(out, 3, 2, seed=1, **SMALL)
    manifest = read_manifest(path)
    before = {i: os.stat(manifest.path(i)).st_mtime_ns for i in range(3)}
    first_frames, _ = decode(manifest.path(1))
    os.unlink(manifest.path(1))
    assert make_dataset(out, 3, 2, seed=1, **SMALL) == path  # same arguments: fills the gap only
    assert os.stat(manifest.path(0)).st_mtime_ns == before[0]
    assert np.array_equal(decode(manifest.path(1))[0], first_frames)
    text = open(path).read()
    with pytest.raises(DatasetError, match="num_videos=3"):
        make_dataset(out, 4, 2, seed=1, **SMALL)
    with pytest.raises(DatasetError, match="seed=1"):
        make_dataset(out, 3, 2, seed=2, **SMALL)
    assert open(path).read() == text
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.csv").write_text("path,label\nmine.mp4,cat\n")
    with pytest.raises(DatasetError, match="not made by make_dataset"):
        make_dataset(str(foreign), 3, 2, **SMALL)
    assert (foreign / "manifest.csv").read_text() == "path,label\nmine.mp4,cat\n"


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_videos=0, num_classes=1), "num_videos"),
    (dict(num_videos=2, num_classes=3), "num_classes"),
    (dict(num_videos=2, num_classes=1, size=(63, 48)), "even"),
    (dict(num_videos=2, num_classes=1, seconds=0.01), "seconds"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(DatasetError, match=match):
        make_dataset(str(tmp_path), **kwargs)
    assert not os.listdir(tmp_path)


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["synthetic", out, "--videos", "2", "--classes", "2", "--seconds", "1", "--size", "32x32", "--quiet"]
    assert main(args) == 0
    assert len(read_manifest(os.path.join(out, "manifest.csv"))) == 2
    capsys.readouterr()
    assert main(args[:3] + ["3"] + args[4:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avidfast: error: ") and err.count("\n") == 1 and "num_videos=2" in err
    assert main(["synthetic", out + "2", "--size", "31x32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avidfast: error: ") and err.count("\n") == 1 and "even" in err


def test_picture_and_sound_share_two_values_of_each_clip():
    """The shape's hue sets the whistle's pitch, its size the tone's loudness (rendered in memory,
    no codec in the way)."""
    from avidfast.data.synthetic import render_clip, whistle_hz

    rate = 24000
    areas, louds = [], []
    for k in range(12):
        frames, audio = render_clip(0, np.random.default_rng([3, k]), 1.0, (64, 64), 16, rate)
        hue = _dominant_hue(frames)
        spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
        freqs = np.fft.rfftfreq(len(audio), 1 / rate)
        band = (freqs > 1400) & (freqs < 9000)
        assert freqs[band][np.argmax(spectrum[band])] == pytest.approx(whistle_hz(hue), rel=0.03)
        rgb = frames.reshape(-1, 3).astype(np.int32)
        shape = (rgb.max(1) >= 150) & (rgb.max(1) - rgb.min(1) >= 80)
        areas.append(shape.mean())
        louds.append(np.abs(audio).max())
    assert np.corrcoef(areas, louds)[0, 1] > 0.8
