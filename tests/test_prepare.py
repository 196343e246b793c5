"""Probing and `avidfast prepare`: bad inputs, audio extraction, transcoding, resuming, safety."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

from avidfast.cli import main
from avidfast.data.manifest import METADATA_COLUMNS, read_manifest
from avidfast.data.prepare import PrepareError, prepare, reason_kind
from avidfast.data.prepare import records as prepare_records
from avidfast.data.prepare.pool import WorkerPool
from avidfast.data.probe import probe, probe_header, reject_reason
from avidfast.data.synthetic import class_style, make_dataset
from media import (
    BAD_MEDIA_EXPECTED, crash_task, make_bad_media, make_clip, make_mixed_media, real_clips, sleep_task, tree_snapshot,
)

MIN = 1.0  # min_seconds of these tests: too_short (0.5 s) is the only clip below it


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return str(folder), make_bad_media(str(folder))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("syn")
    return make_dataset(str(folder), 3, 3, seconds=2.0, seed=3, size=(64, 48))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- probe


@pytest.mark.parametrize("kind", sorted(BAD_MEDIA_EXPECTED))
def test_probe_accepts_or_rejects_each_kind(bad, kind):
    _, files = bad
    result = probe(files[kind])
    reason = reject_reason(result, MIN)
    expected = BAD_MEDIA_EXPECTED[kind]
    if expected is None:
        assert reason is None, result
        assert result.duration >= 1.9 and result.fps > 0 and result.width and result.sample_rate
    else:
        assert reason is not None and reason.startswith(expected), (kind, reason)
        assert "\n" not in reason and len(reason) < 200


def test_probe_reports_what_odd_files_hold(bad):
    _, files = bad
    multichannel = probe(files["multichannel"])
    assert (multichannel.sample_rate, multichannel.channels) == (44100, 6)
    odd_rate = probe(files["odd_rate"])
    assert (odd_rate.sample_rate, odd_rate.channels) == (11025, 2)
    odd_size = probe(files["odd_size"])
    assert (odd_size.width, odd_size.height) == (97, 61)
    vfr = probe(files["vfr"])
    assert vfr.num_frames == 40
    assert vfr.fps == pytest.approx(40 / vfr.duration, rel=0.02) and abs(vfr.fps - 16) > 0.5
    webm = probe(files["vp9_webm"])
    assert (webm.video_codec, webm.audio_codec, webm.sample_rate) == ("vp9", "opus", 48000)
    assert webm.duration == pytest.approx(2.0, abs=0.07)


def test_probe_never_raises(tmp_path, bad):
    folder, files = bad
    (tmp_path / "zeros.mkv").write_bytes(bytes(100_000))
    (tmp_path / "random.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    cases = {str(tmp_path / "missing.mp4"): "no such file", folder: "not a regular file",
             str(tmp_path / "zeros.mkv"): "", str(tmp_path / "random.webm"): ""}
    for path, expected in cases.items():
        result = probe(path)
        assert result.error and result.error.startswith(expected), (path, result.error)
    assert probe(files["zero_byte"], check="header").error == "zero-byte file"
    assert probe(files["mid_stream_corruption"], check="full").error.startswith("decode error")
    assert probe(files["vfr"], check="header").error is None


def test_full_check_catches_video_only_corruption(tmp_path):
    """Garbage inside video packets only (no audio there): the fast check may miss it, full does not."""
    import av

    path = make_clip(str(tmp_path / "v.mp4"), seconds=3.0, audio=False, size=(128, 96), seed=4)
    with av.open(path) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size and not p.is_keyframe]
    pos, size = packets[len(packets) // 2]
    data = bytearray(open(path, "rb").read())
    data[pos + 8:pos + size] = np.random.default_rng(1).integers(0, 256, size - 8, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))
    assert probe(path, check="full").error.startswith("decode error in the video stream")


def _longer_audio(path):
    """A clip whose audio (4 s) outlasts its video (32 frames at 16 fps: 2 s), as the container says."""
    import av

    make_clip(path, seconds=4.0, frame_times=[i / 16 for i in range(32)], seed=13)
    with av.open(path) as container:
        assert container.duration / 1e6 == pytest.approx(4.0, abs=0.1)
    return path


def test_duration_is_the_video_streams_not_the_containers(tmp_path):
    """The one duration rule (avidfast.data.probe's docstring): header and measuring passes agree."""
    path = _longer_audio(str(tmp_path / "longer_audio.mp4"))
    for check in ("header", "fast", "full"):
        result = probe(path, check=check)
        assert result.error is None, (check, result.error)
        assert result.duration == pytest.approx(2.0, abs=0.07), check
        assert result.audio_duration == pytest.approx(4.0, abs=0.07), check
    assert probe_header(path, "video").duration == pytest.approx(2.0, abs=0.07)
    assert probe_header(path, "audio").audio_duration == pytest.approx(4.0, abs=0.07)
    silent = make_clip(str(tmp_path / "silent.mp4"), seconds=2.0, audio=False)
    with pytest.raises(ValueError, match="no audio stream"):
        probe_header(silent, "audio")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="cannot open container"):
        probe_header(str(tmp_path / "text.mp4"), "video")


# ----------------------------------------------------------------------------- prepare


def test_prepare_folder(tmp_path, bad):
    folder, files = bad
    before = tree_snapshot(folder)
    out = str(tmp_path / "out")
    summary = prepare(folder, out, workers=0, min_seconds=MIN, progress=False)
    kept = read_manifest(os.path.join(out, "manifest.csv"))
    rejected = read_csv(os.path.join(out, "rejected.csv"))
    in_folder = dict(files)  # every file, the audio-only .m4a too
    expected = dict(BAD_MEDIA_EXPECTED, no_video="audio only (no video stream)")
    accepted = {os.path.basename(v) for k, v in in_folder.items() if expected[k] is None}
    assert {os.path.basename(r["path"]) for r in kept.rows} == accepted
    assert kept.columns == ["path"] + [c for c in METADATA_COLUMNS if c != "audio_path"]
    for i, row in enumerate(kept.rows):
        assert not os.path.isabs(row["path"])  # relative to OUT ...
        assert os.path.samefile(kept.path(i), os.path.join(folder, os.path.basename(row["path"])))  # ... the source
        assert row["duration"] >= 1.9 and row["width"] and row["sample_rate"]
    reasons = {os.path.basename(r["path"]): r["reason"] for r in rejected}
    for kind, path in in_folder.items():
        if expected[kind] is not None:
            assert reasons[os.path.basename(path)].startswith(expected[kind])
    assert (summary.kept, summary.rejected, summary.total) == (len(accepted), len(reasons), len(in_folder))
    assert summary.reasons["cannot open container"] == 2 and summary.probed == len(in_folder)
    assert tree_snapshot(folder) == before  # sources untouched, nothing added next to them


def test_prepare_manifest_in_worker_processes(tmp_path, bad):
    """A manifest with every kind (labels = kinds), probed by 2 spawned workers."""
    folder, files = bad
    src = tmp_path / "list.csv"
    with open(src, "w") as f:
        f.write("path,label,note\n")
        for kind, path in sorted(files.items()):
            f.write(f"{os.path.relpath(path, folder)},{kind},n-{kind}\n")
    out = str(tmp_path / "out")
    summary = prepare(str(src), out, root=folder, workers=2, min_seconds=MIN, progress=False)
    kept = read_manifest(os.path.join(out, "manifest.csv"))
    assert kept.columns[:2] == ["path", "label"] and kept.columns[-1] == "note"
    assert sorted(r["label"] for r in kept.rows) == sorted(k for k, v in BAD_MEDIA_EXPECTED.items() if v is None)
    assert all(r["note"] == f"n-{r['label']}" for r in kept.rows)
    rejected = read_csv(os.path.join(out, "rejected.csv"))
    by_name = {os.path.basename(files[k]): k for k in files}
    expected = dict(BAD_MEDIA_EXPECTED, no_video="audio only (no video stream)")
    for row in rejected:
        assert row["reason"].startswith(expected[by_name[os.path.basename(row["path"])]])
    assert summary.rejected == len(rejected) == sum(v is not None for v in BAD_MEDIA_EXPECTED.values())
    assert summary.reasons["audio only"] == 1  # the .m4a, listed in the manifest


def test_every_file_is_accounted_for(tmp_path, capsys):
    """Real clips in the containers data sets ship, with sound, beside files that are not clips:
    each one is a manifest row or a rejected row with its reason; the summary adds up."""
    src = tmp_path / "src"
    expected = make_mixed_media(str(src))
    (src / ".DS_Store").write_bytes(b"\0\1")
    (src / ".cache").mkdir()
    (src / ".cache" / "thumb.mp4").write_bytes(b"")
    out = tmp_path / "out"
    notes = []
    summary = prepare(str(src), str(out), workers=2, min_seconds=MIN, progress=False, transcode="h264",
                      extract_audio="wav", log=notes.append)
    kept = read_manifest(str(out / "manifest.csv"))
    rejected = read_csv(out / "rejected.csv")
    kept_names = {os.path.relpath(os.path.splitext(r["path"])[0], "videos") for r in kept.rows}
    assert kept_names == {"hello_mpeg", "hello_ogg", "hello_ts", "long_audio"}  # hello.*: stems told apart
    reasons = {os.path.relpath(r["path"], os.path.join("..", "src")): r["reason"] for r in rejected}
    assert set(reasons) == {name for name, reason in expected.items() if reason is not None}
    for name, reason in reasons.items():
        assert reason.startswith(expected[name]), (name, reason)
    assert (summary.total, summary.kept, summary.rejected) == (len(expected), 4, 4)
    assert summary.kept + summary.rejected == summary.total == len(kept.rows) + len(rejected)
    assert summary.format().startswith(f"found {len(expected)} files: kept 4, rejected 4")
    assert any("left out 2 hidden" in note for note in notes + summary.warnings)
    for i, row in enumerate(kept.rows):  # every kept clip was transcoded and its sound extracted
        assert row["duration"] >= 1.9 and row["audio_duration"] >= 1.9, row
        assert _wav(kept.audio_path(i)).std() > 0.05, row  # the sound is there
    long_audio = next(r for r in kept.rows if "long_audio" in r["path"])
    assert long_audio["duration"] == pytest.approx(2.0, abs=0.07)


def test_webm_audio_outlasting_video_is_not_truncation(tmp_path):
    """WebM states no per-stream duration: the container's (the longest stream's) must not be
    taken as the video's promise; a WebM cut short is still caught."""
    path = make_clip(str(tmp_path / "long_audio.webm"), seconds=4.0, codec="vp9", sample_rate=48000,
                     frame_times=[i / 16 for i in range(32)], seed=24)
    for check in ("fast", "full"):
        result = probe(path, check=check)
        assert result.error is None, (check, result.error)
        assert result.duration == pytest.approx(2.0, abs=0.07)
        assert result.audio_duration == pytest.approx(4.0, abs=0.07)
    data = open(path, "rb").read()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    assert probe(str(tmp_path / "cut.webm")).error.startswith("truncated: ")


def test_missing_manifest_row_is_a_rejected_row(tmp_path, synthetic):
    rows = read_csv(synthetic)
    src = tmp_path / "list.csv"
    folder = os.path.dirname(synthetic)
    with open(src, "w") as f:
        f.write("path,label\n")
        f.write(f"{os.path.join(folder, rows[0]['path'])},{rows[0]['label']}\n")
        f.write(f"{tmp_path / 'gone.mp4'},{rows[0]['label']}\n")
    summary = prepare(str(src), str(tmp_path / "out"), workers=0, min_seconds=MIN, progress=False,
                      transcode="h264", extract_audio="wav")
    assert (summary.total, summary.kept, summary.rejected) == (2, 1, 1)
    assert read_csv(tmp_path / "out" / "rejected.csv")[0]["reason"] == "no such file"


def _wav(path):
    with wave.open(path) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


def _decode_audio(path):
    import av

    with av.open(path) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.sample_rate, stream.codec_context.channels) == (24000, 1)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)]).astype(np.float32) / 32768


@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_extract_audio(tmp_path, synthetic, bad, kind):
    src = read_manifest(synthetic)
    out = str(tmp_path / "out")
    prepare(synthetic, out, workers=0, extract_audio=kind, min_seconds=MIN, progress=False)
    kept = read_manifest(os.path.join(out, "manifest.csv"))
    assert len(kept) == 3 and kept.columns[-1] == "audio_path"
    for i, row in enumerate(kept.rows):
        assert row["audio_path"] == "audio/" + os.path.splitext(src.rows[i]["path"])[0] + "." + kind  # mirrors SRC
        samples = (_wav if kind == "wav" else _decode_audio)(kept.audio_path(i))
        assert len(samples) / 24000 == pytest.approx(probe(src.path(i)).audio_duration, abs=0.05)
        # the content survived: the strongest partial is (a low harmonic of) the class's pitch
        f0 = 220.0 * 2 ** (class_style(int(row["label"]))["semitone"] / 12)
        spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
        peak = np.fft.rfftfreq(len(samples), 1 / 24000)[np.argmax(spectrum)]
        assert min(abs(peak / (k * f0) - 1) for k in (1, 2, 3)) < 0.03
    # other rates and channel counts are resampled and down-mixed
    folder, files = bad
    manifest = tmp_path / "odd.csv"
    manifest.write_text("path\n" + "\n".join(files[k] for k in ("multichannel", "odd_rate", "vfr")) + "\n")
    prepare(str(manifest), str(tmp_path / "odd"), workers=0, extract_audio=kind, min_seconds=MIN, progress=False)
    odd = read_manifest(str(tmp_path / "odd" / "manifest.csv"))
    for i in range(3):
        samples = (_wav if kind == "wav" else _decode_audio)(odd.audio_path(i))
        assert len(samples) / 24000 == pytest.approx(probe(odd.path(i)).audio_duration, abs=0.05)
        assert np.abs(samples).max() > 0.1


def _packet_times(path):
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(float(p.pts * p.time_base), p.is_keyframe) for p in container.demux(stream) if p.pts is not None]
    return sorted(packets)


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_transcode_constant_fps_short_gop(tmp_path, bad, codec):
    folder, files = bad
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(files["vfr"], src / "vfr.mp4")
    shutil.copy(files["odd_size"], src / "sub" / "odd.mp4")
    make_clip(str(src / "sub" / "fast.mkv"), seconds=2.5, fps=30, codec="mpeg4", seed=20)
    make_clip(str(src / "sub" / "fast.mp4"), seconds=2.0, fps=25, seed=21)  # same stem: outputs must not collide
    out = str(tmp_path / "out")
    summary = prepare(str(src), out, workers=0, transcode=codec, extract_audio="wav" if codec == "vp9" else None,
                      min_seconds=MIN, progress=False)
    assert summary.kept == 4
    kept = read_manifest(os.path.join(out, "manifest.csv"))
    ext = ".webm" if codec == "vp9" else ".mp4"
    assert sorted(r["path"] for r in kept.rows) == sorted(
        f"videos/{p}{ext}" for p in ("sub/fast_mkv", "sub/fast_mp4", "sub/odd", "vfr"))
    for i, row in enumerate(kept.rows):
        result = probe(kept.path(i), check="full")
        assert result.error is None and result.video_codec == codec
        assert row["fps"] == 16 and result.fps == pytest.approx(16)
        assert row["width"] % 2 == 0 and row["height"] % 2 == 0 and (row["width"], row["height"]) == (
            result.width, result.height)
        times = _packet_times(kept.path(i))
        assert len(times) == round(row["duration"] * 16) == result.num_frames
        assert np.allclose(np.diff([t for t, _ in times]), 1 / 16, atol=1.1e-3)  # webm stores milliseconds
        keys = [t for t, key in times if key]
        assert keys[0] == 0 and np.all(np.diff(keys + [times[-1][0] + 1 / 16]) <= 1.0 + 1e-3)
        if codec == "h264":
            assert (result.audio_codec, result.channels) == ("aac", 1)
        else:
            assert not result.has_audio and row["audio_path"]  # audio went to the WAV instead
    # durations follow the sources (constant-rate resampling neither drops nor invents time)
    by_path = {r["path"]: r for r in kept.rows}
    assert by_path[f"videos/sub/fast_mkv{ext}"]["duration"] == pytest.approx(2.5, abs=1 / 16)
    assert by_path[f"videos/vfr{ext}"]["duration"] == pytest.approx(probe(files["vfr"]).duration, abs=1 / 16)
    if codec == "vp9":  # DALI's CPU backend decodes it
        pytest.importorskip("nvidia.dali")
        from nvidia.dali import fn, pipeline_def, types

        paths = [kept.path(i) for i in range(len(kept))]

        @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
        def pipeline():
            data = fn.external_source(source=lambda: [np.fromfile(p, np.uint8) for p in paths], batch=True,
                                      dtype=types.UINT8)
            return fn.decoders.video(data, device="cpu")

        pipe = pipeline()
        pipe.build()
        (videos,) = pipe.run()
        for i, row in enumerate(kept.rows):
            assert np.array(videos[i]).shape == (round(row["duration"] * 16), row["height"], row["width"], 3)


def test_short_side_copies(tmp_path):
    """--short-side: the copies' short side is N (aspect kept, even sides, never enlarged); the
    manifest gives the copies' size, which is the files' own."""
    src = tmp_path / "src"
    make_clip(str(src / "wide.mp4"), seconds=2.0, size=(97, 61), seed=31)
    make_clip(str(src / "tall.mp4"), seconds=2.0, size=(48, 64), seed=32)
    make_clip(str(src / "small.mp4"), seconds=2.0, size=(40, 24), seed=33)
    out = str(tmp_path / "out")
    prepare(str(src), out, workers=0, transcode="vp9", short_side=32, min_seconds=MIN, progress=False)
    kept = read_manifest(os.path.join(out, "manifest.csv"))
    sizes = {os.path.basename(row["path"]): (row["width"], row["height"]) for row in kept.rows}
    assert sizes == {"wide.webm": (50, 32), "tall.webm": (32, 42), "small.webm": (40, 24)}
    for i, row in enumerate(kept.rows):
        result = probe(kept.path(i), check="full")
        assert result.error is None and (result.width, result.height) == (row["width"], row["height"])
    again = prepare(str(src), out, workers=0, transcode="vp9", short_side=40, min_seconds=MIN, progress=False)
    assert again.processed == 3  # another size: outputs redone
    with pytest.raises(PrepareError, match="needs transcode"):
        prepare(str(src), str(tmp_path / "o2"), short_side=32, progress=False)
    with pytest.raises(PrepareError, match="short_side must be"):
        prepare(str(src), str(tmp_path / "o2"), transcode="h264", short_side=8, progress=False)


def test_transcode_keeps_the_picture(tmp_path, synthetic):
    """A 16 fps source re-encoded at 16 fps: frame k of the output shows frame k of the source."""
    import av

    out = str(tmp_path / "out")
    prepare(synthetic, out, workers=0, transcode="h264", min_seconds=MIN, progress=False)
    src, kept = read_manifest(synthetic), read_manifest(os.path.join(out, "manifest.csv"))
    for i in range(len(src)):
        with av.open(src.path(i)) as a, av.open(kept.path(i)) as b:
            fa = np.stack([f.to_ndarray(format="rgb24") for f in a.decode(video=0)]).astype(np.float32)
            fb = np.stack([f.to_ndarray(format="rgb24") for f in b.decode(video=0)]).astype(np.float32)
        assert fa.shape == fb.shape
        assert np.abs(fa - fb).mean() < 6  # re-encoding loss only
        assert np.abs(fa[1:] - fb[:-1]).mean() > np.abs(fa - fb).mean()  # and no shift by a frame


def test_rerun_resumes_without_probing_again(tmp_path, synthetic, monkeypatch):
    out = str(tmp_path / "out")
    first = prepare(synthetic, out, workers=0, transcode="vp9", extract_audio="wav", min_seconds=MIN, progress=False)
    assert (first.probed, first.processed, first.reused) == (3, 3, 0)
    outputs = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if not f.endswith(".csv")]
    stamps = {p: os.stat(p).st_mtime_ns for p in outputs}
    text = open(os.path.join(out, "manifest.csv")).read()

    def forbidden(payload):
        raise AssertionError(f"called again for {payload}")

    monkeypatch.setattr(prepare_records, "probe_task", forbidden)
    monkeypatch.setattr(prepare_records, "process_task", forbidden)
    again = prepare(synthetic, out, workers=0, transcode="vp9", extract_audio="wav", min_seconds=MIN, progress=False)
    assert (again.probed, again.processed, again.reused, again.kept) == (0, 0, 3, 3)
    assert {p: os.stat(p).st_mtime_ns for p in outputs} == stamps
    assert open(os.path.join(out, "manifest.csv")).read() == text
    monkeypatch.undo()

    kept = read_manifest(os.path.join(out, "manifest.csv"))
    os.unlink(kept.audio_path(1))  # a lost output is made again; nothing is probed again
    again = prepare(synthetic, out, workers=0, transcode="vp9", extract_audio="wav", min_seconds=MIN, progress=False)
    assert (again.probed, again.processed, again.reused) == (0, 1, 2)
    assert os.path.isfile(kept.audio_path(1))
    assert os.stat(kept.path(0)).st_mtime_ns == stamps[kept.path(0)]
    changed = read_manifest(synthetic).path(2)  # a source that changed is probed again
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    again = prepare(synthetic, out, workers=0, transcode="vp9", extract_audio="wav", min_seconds=MIN, progress=False)
    assert (again.probed, again.processed) == (1, 1)
    again = prepare(synthetic, out, workers=0, transcode="vp9", extract_audio="wav", fps=8, min_seconds=MIN,
                    progress=False)  # other options: outputs redone
    assert (again.probed, again.processed) == (0, 3)
    assert read_manifest(os.path.join(out, "manifest.csv")).rows[0]["fps"] == 8
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]


def _finished(out):
    """Source path -> outputs of every file whose record says its outputs are complete."""
    state = os.path.join(out, ".prepare")
    done = {}
    for name in os.listdir(state) if os.path.isdir(state) else []:
        if name.endswith(".json") and name != "options.json" and not name.startswith("."):
            with open(os.path.join(state, name)) as f:
                record = json.load(f)
            if "result" in record.get("outputs", {}):
                done[record["source"]] = record["outputs"]["result"]
    return done


def test_sigkill_half_way_resumes_without_redoing_finished_files(tmp_path):
    """A real kill -9 of the process group (the run and its worker) half-way through a folder."""
    src = tmp_path / "src"
    for i in range(6):
        make_clip(str(src / f"clip_{i}.mp4"), seconds=3.0, size=(160, 120), seed=40 + i)
    out = str(tmp_path / "out")
    args = [sys.executable, "-m", "avidfast.cli", "prepare", str(src), out, "--transcode", "h264",
            "--extract-audio", "wav", "--workers", "1", "--min-seconds", "1", "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(_finished(out)) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate()
    assert run.returncode == -signal.SIGKILL
    finished = _finished(out)
    assert 2 <= len(finished) < 6, len(finished)  # killed half-way
    assert not os.path.exists(os.path.join(out, "manifest.csv"))  # nothing listed before the run ends
    stamps = {os.path.join(out, files[k]["path"]): os.stat(os.path.join(out, files[k]["path"])).st_mtime_ns
              for files in finished.values() for k in ("video", "audio")}

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.splitlines()[0]
    assert summary.startswith("found 6 files: kept 6, rejected 0"), summary
    assert f"{6 - len(finished)} processed, {len(finished)} reused" in summary, summary
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # finished files not redone
    kept = read_manifest(os.path.join(out, "manifest.csv"))
    for i in range(len(kept)):  # every listed output is whole
        video = probe(kept.path(i))
        assert video.error is None and video.duration == pytest.approx(3.0, abs=0.07), video
        assert len(_wav(kept.audio_path(i))) == pytest.approx(kept.rows[i]["audio_duration"] * 24000, abs=1)
        assert kept.rows[i]["audio_duration"] >= 2.95
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]  # the kill's leftovers are gone


def test_run_with_other_options_stopped_half_way_leaves_no_outdated_manifest(tmp_path, synthetic, monkeypatch):
    out = str(tmp_path / "out")
    prepare(synthetic, out, workers=0, transcode="h264", min_seconds=MIN, progress=False)
    calls = []
    real = prepare_records.process_task

    def stop_after_one(payload):
        if calls:
            raise KeyboardInterrupt  # the run is stopped while the second file is re-encoded
        calls.append(payload)
        return real(payload)

    monkeypatch.setattr(prepare_records, "process_task", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare(synthetic, out, workers=0, transcode="h264", fps=8, min_seconds=MIN, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.csv"))  # it listed 16 fps files, one is now 8 fps
    monkeypatch.undo()
    again = prepare(synthetic, out, workers=0, transcode="h264", fps=8, min_seconds=MIN, progress=False)
    assert (again.processed, again.reused) == (2, 1)
    assert [row["fps"] for row in read_manifest(os.path.join(out, "manifest.csv")).rows] == [8, 8, 8]


def test_refuses_to_write_over_sources(tmp_path, bad):
    folder, files = bad
    with pytest.raises(PrepareError, match="source folder"):
        prepare(folder, folder, workers=0, progress=False)
    out = tmp_path / "out"
    (out / "videos").mkdir(parents=True)
    shutil.copy(files["vfr"], out / "videos" / "a.mp4")
    before = tree_snapshot(str(out))
    with pytest.raises(PrepareError, match="overwrite a source"):
        prepare(str(out / "videos"), str(out), workers=0, transcode="h264", progress=False)
    manifest = tmp_path / "m" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path\n{files['vfr']}\n")
    with pytest.raises(PrepareError):
        prepare(str(manifest), str(manifest.parent), workers=0, progress=False)
    assert manifest.read_text() == f"path\n{files['vfr']}\n"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.csv").write_text("path\nx.mp4\n")
    with pytest.raises(PrepareError, match="did not write"):
        prepare(folder, str(foreign), workers=0, progress=False)
    assert tree_snapshot(str(out)) == before


def test_out_inside_the_source_folder_is_not_scanned(tmp_path, bad):
    _, files = bad
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(files["vfr"], src / "a.mp4")
    for _ in range(2):
        summary = prepare(str(src), str(src / "prepared"), workers=0, transcode="h264", min_seconds=MIN,
                          progress=False)
        assert summary.total == 1 and summary.kept == 1


def test_cli_errors_are_one_line(tmp_path, capsys, bad):
    folder, _ = bad
    bad_manifest = tmp_path / "bad.csv"
    bad_manifest.write_text("file,label\na.mp4,1\n")
    for args, expected in [
        (["prepare", str(tmp_path / "missing"), str(tmp_path / "o")], "no such file or folder"),
        (["prepare", folder, folder], "source folder"),
        (["prepare", str(bad_manifest), str(tmp_path / "o")], "'path' column"),
        (["prepare", folder, str(tmp_path / "o"), "--root", folder], "--root"),
    ]:
        assert main(args + ["--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("avidfast: error: ") and err.count("\n") == 1 and expected in err, err
    assert main(["prepare", folder, str(tmp_path / "ok"), "--workers", "0", "--min-seconds", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "found 14 files: kept 6, rejected 8" in printed and "cannot open container" in printed  # .m4a too


def test_reason_kinds():
    assert reason_kind("shorter than 2 s (1.2 s)") == "shorter than 2 s"
    assert reason_kind("decode error in the audio stream at 1.3 s: Invalid data") == "decode error in the audio stream"
    assert reason_kind("cannot open container: Invalid data found") == "cannot open container"
    assert reason_kind("truncated: video data ends at 1.0 s of 2.0 s") == "truncated"


def test_worker_pool_survives_hangs_and_crashes():
    pool = WorkerPool(1)
    try:
        tasks = [("slow", {"seconds": 60}, 1.0), ("crash", {}, 30.0), ("ok", {"seconds": 0}, 30.0)]
        results = {}
        for key, payload, timeout in tasks:
            fn = crash_task if key == "crash" else sleep_task
            results.update({k: (s, v) for k, s, v in pool.run(fn, [(key, payload, timeout)])})
    finally:
        pool.close()
    assert results["slow"] == ("failed", "timed out after 1 s")
    assert results["crash"][0] == "failed" and "died (exit code 3)" in results["crash"][1]
    assert results["ok"] == ("ok", {"slept": 0})


def test_real_clips(tmp_path):
    manifest = real_clips(2)
    if manifest is None:
        pytest.skip("real media not in the cache (run: python scripts/fetch_media.py)")
    before = tree_snapshot(os.path.dirname(manifest))
    out = str(tmp_path / "out")
    summary = prepare(manifest, out, workers=0, extract_audio="wav", min_seconds=2.0, progress=False)
    assert (summary.kept, summary.rejected) == (2, 0)
    kept = read_manifest(os.path.join(out, "manifest.csv"))
    for i, row in enumerate(kept.rows):
        assert (row["width"], row["height"], row["fps"]) == (1280, 720, 24.0)
        assert 9 < row["duration"] <= 10.5 and row["sample_rate"] == 44100
        samples = _wav(kept.audio_path(i))
        assert abs(len(samples) / 24000 - row["duration"]) < 0.6 and np.abs(samples).max() > 0.05
    assert tree_snapshot(os.path.dirname(manifest)) == before
