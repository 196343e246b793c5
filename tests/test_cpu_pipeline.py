"""The CPU pipeline: batch contract, determinism, sharding, bad input, real clips."""
import logging
import os

import numpy as np
import pytest
import torch
from media import BAD_MEDIA_EXPECTED, make_bad_media, make_clip, real_clips

from avidfast.data.audio import get_preset
from avidfast.data.cpu_pipeline import BadTestVideo, ClipDataset, CPULoader, TooManyBadSamples
from avidfast.data.manifest import read_manifest, write_manifest
from avidfast.data.torchcodec_video import torchcodec_error
from avidfast.data.synthetic import make_dataset
from avidfast.data.video import VideoConfig

SMALL = VideoConfig(frames=8, crop=64)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("syn")), num_videos=8, num_classes=2, seconds=2.0, seed=3, size=(96, 72), workers=1)


def _check_contract(batch, batch_size, video: VideoConfig, preset):
    assert batch["video"].shape == (batch_size, 3, video.frames, video.crop, video.crop)
    assert batch["audio"].shape == (batch_size, 1, preset.bins, preset.frames)
    assert batch["video"].dtype == batch["audio"].dtype == torch.float32
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (batch_size,)
    mean, std = torch.tensor(video.mean), torch.tensor(video.std)
    lo, hi = (-mean / std).view(1, 3, 1, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1, 1)
    assert (batch["video"] >= lo - 1e-5).all() and (batch["video"] <= hi + 1e-5).all()
    assert batch["video"].std() > 0.05  # real pictures, not a constant
    assert torch.isfinite(batch["audio"]).all() and batch["audio"].std() > 1


@pytest.mark.parametrize("preset_name", ["table5", "table6"])
def test_training_batches_follow_the_contract(synthetic, preset_name):
    manifest = read_manifest(synthetic)
    preset = get_preset(preset_name)
    loader = CPULoader(ClipDataset(manifest, video=SMALL, audio_preset=preset_name), batch_size=4, workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    for batch in batches:
        _check_contract(batch, 4, SMALL, preset)
        labels = manifest.label_indices()
        assert batch["label"].tolist() == [labels[i] for i in batch["index"].tolist()]
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(8))
    assert loader.bad_samples == 0


def test_training_is_deterministic_per_epoch_and_independent_of_workers(synthetic):
    manifest = read_manifest(synthetic)

    def epoch(e, workers, seed=0):
        loader = CPULoader(ClipDataset(manifest, video=SMALL, seed=seed), batch_size=4, workers=workers)
        loader.set_epoch(e)
        return list(loader)

    a, b = epoch(1, 0), epoch(1, 2)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"])
        torch.testing.assert_close(x["video"], y["video"], rtol=0, atol=0)
        torch.testing.assert_close(x["audio"], y["audio"], rtol=0, atol=0)
    c = epoch(2, 0)
    assert not torch.equal(torch.cat([x["index"] for x in a]), torch.cat([x["index"] for x in c]))
    d = epoch(1, 0, seed=1)
    assert not torch.equal(a[0]["video"], d[0]["video"])


def test_evaluation_clips_are_deterministic_and_ordered(synthetic):
    manifest = read_manifest(synthetic)

    def run():
        dataset = ClipDataset(manifest, video=SMALL, mode="eval", clips_per_video=3)
        return list(CPULoader(dataset, batch_size=5, workers=0))

    a, b = run(), run()
    index = torch.cat([x["index"] for x in a])
    assert index.tolist() == [v for v in range(8) for _ in range(3)]
    assert torch.cat([x["clip"] for x in a]).tolist() == [0, 1, 2] * 8
    for x, y in zip(a, b):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["audio"], y["audio"])
    videos = torch.cat([x["video"] for x in a])
    assert not torch.equal(videos[0], videos[2])  # the first and last clip of a video differ


def test_ranks_share_an_epoch_without_overlap(synthetic):
    manifest = read_manifest(synthetic)
    seen = []
    for rank in range(2):
        loader = CPULoader(ClipDataset(manifest, video=SMALL), batch_size=2, workers=0, rank=rank, world_size=2)
        loader.set_epoch(4)
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 4
    assert sorted(seen[0] + seen[1]) == list(range(8))


def test_clips_per_video_repeats_each_video_with_its_row_as_index(synthetic):
    manifest = read_manifest(synthetic)
    loader = CPULoader(ClipDataset(manifest, video=SMALL, clips_per_video=1), batch_size=4, workers=0,
                       samples_per_epoch=16)
    index = torch.cat([b["index"] for b in loader]).tolist()
    assert sorted(index) == sorted(list(range(8)) * 2)


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    bad = make_bad_media(str(folder))
    good = [make_clip(str(folder / f"good{i}.mp4"), seconds=2.0, seed=20 + i) for i in range(4)]
    rows = [{"path": os.path.basename(p), "kind": "good"} for p in good]
    rows += [{"path": os.path.basename(p), "kind": kind} for kind, p in bad.items()]
    write_manifest(str(folder / "m.csv"), rows)
    return str(folder / "m.csv")


def test_each_bad_input_is_reported_logged_and_counted_never_replaced_in_evaluation(bad_manifest, caplog):
    manifest = read_manifest(bad_manifest)
    kinds = [r["kind"] for r in manifest.rows]
    video = VideoConfig(frames=8, crop=32)  # 0.5 s clips, so the 2 s good files are long enough
    dataset = ClipDataset(manifest, video=video, mode="eval", clips_per_video=1)
    with caplog.at_level(logging.WARNING, logger="avidfast.data.cpu_pipeline"):
        loader = CPULoader(dataset, batch_size=len(manifest), workers=0, on_bad="exclude")
        (batch,) = list(loader)
    _check_contract(batch, len(manifest) - len(loader.bad_videos), video, get_preset("table5"))
    failed_paths = {os.path.basename(path) for path, _ in loader.bad_files}
    failed_kinds = {kinds[i] for i in range(len(kinds)) if manifest.rows[i]["path"] in failed_paths}
    unreadable = {"zero_byte", "truncated", "truncated_faststart", "no_audio", "no_video", "not_media", "too_short"}
    assert unreadable <= failed_kinds
    assert failed_kinds <= unreadable | {"mid_stream_corruption"}
    # every row is either read as itself, once, or reported: no video stands in for another
    assert sorted(batch["index"].tolist() + loader.bad_videos) == list(range(len(manifest)))
    for kind in ("good", "multichannel", "odd_rate", "vfr", "odd_size", "vp9_webm", "mpeg4_mkv"):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        assert set(rows) <= set(batch["index"].tolist()), kind
    assert loader.bad_samples == len(loader.bad_files) >= len(unreadable)
    for path, reason in loader.bad_files:
        assert any(path in message and reason in message for message in caplog.messages)
    assert set(BAD_MEDIA_EXPECTED) | {"good"} == set(kinds)
    with pytest.raises(BadTestVideo, match="test video .* cannot be read"):  # the default: stop, naming it
        list(CPULoader(dataset, batch_size=4, workers=0))


def test_too_many_bad_samples_stop_the_epoch_with_advice(bad_manifest):
    dataset = ClipDataset(read_manifest(bad_manifest), video=VideoConfig(frames=8, crop=32))
    loader = CPULoader(dataset, batch_size=2, workers=0)  # default max_bad_fraction = 0.01
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction=0.01.*rejected.csv"):
        list(loader)


def test_bad_samples_do_not_hang_worker_processes(bad_manifest):
    dataset = ClipDataset(read_manifest(bad_manifest), video=VideoConfig(frames=8, crop=32))
    loader = CPULoader(dataset, batch_size=3, workers=2, max_bad_fraction=1.0, timeout=120)
    total = sum(b["index"].numel() for b in loader)
    assert total == len(loader) * 3 and loader.bad_samples > 0


def test_real_clips_give_the_contract():
    manifest_path = real_clips()
    if manifest_path is None:
        pytest.skip("real media (Big Buck Bunny) is not in the cache: run `python scripts/fetch_media.py`")
    manifest = read_manifest(manifest_path)
    video = VideoConfig()  # 16 x 112^2, table5 audio
    loader = CPULoader(ClipDataset(manifest, video=video), batch_size=len(manifest), workers=0)
    (batch,) = list(loader)
    _check_contract(batch, len(manifest), video, get_preset("table5"))


def test_clips_lie_within_the_video_stream_when_the_audio_is_longer(tmp_path, monkeypatch):
    """Without metadata in the manifest, the clip range is the video stream's duration (2 s), not the
    container's (4 s, the audio's): avidfast.data.probe's rule."""
    from avidfast.data import video as video_ops

    make_clip(str(tmp_path / "a.mp4"), seconds=4.0, frame_times=[i / 16 for i in range(32)], seed=13)
    write_manifest(str(tmp_path / "m.csv"), [{"path": "a.mp4"}])
    starts = []
    decode = video_ops.decode_frames

    def recording(path, start, *args, **kwargs):
        starts.append(start)
        return decode(path, start, *args, **kwargs)

    monkeypatch.setattr(video_ops, "decode_frames", recording)
    video = VideoConfig(frames=8, crop=32)  # 0.5 s clips
    manifest = read_manifest(str(tmp_path / "m.csv"))
    ClipDataset(manifest, video=video, mode="eval", decoder="pyav").load(0, epoch=0, position=0)
    assert starts == [pytest.approx((2.0 - 0.5) / 2, abs=0.01)]  # the middle of the video, not 1.75 s
    train = ClipDataset(manifest, video=video, mode="train", decoder="pyav")
    for position in range(12):
        train.load(0, epoch=0, position=position)
    assert max(starts[1:]) <= 2.0 - 0.5 + 0.01


@pytest.mark.skipif(torchcodec_error() is not None, reason=str(torchcodec_error()))
@pytest.mark.parametrize("kind", ["constant", "variable"])
def test_torchcodec_decoder_gives_pyavs_frames(tmp_path, kind):
    """The same frames at the same times from both decoders: identical pixels where nothing is
    resized; where both resize, only the filters differ (FFmpeg's bilinear vs torch's
    antialiased bilinear, on a picture with a noisy blue channel)."""
    from avidfast.data import video as video_ops
    from avidfast.data.torchcodec_video import decode_frames_torchcodec

    times = None if kind == "constant" else list(np.cumsum(np.random.default_rng(5).choice([0.03, 0.06, 0.1], 40)))
    path = make_clip(str(tmp_path / "c.mp4"), seconds=3.0, fps=16, size=(96, 64), frame_times=times, seed=17)
    config = VideoConfig(frames=8, crop=32)
    for start, crop, size in [(0.0, None, None), (0.45, (8, 16, 32, 32), (32, 32)), (1.6, (10, 30, 32, 32), (32, 32)),
                              (1.3, (0, 0, 64, 96), (32, 32))]:
        ours = decode_frames_torchcodec(path, start, config, crop=crop, size=size).astype(np.float32)
        pyav = video_ops.decode_frames(path, start, config, crop=crop, size=size).astype(np.float32)
        assert ours.shape == pyav.shape == (8, *(size or (64, 96)), 3)
        difference = np.abs(ours - pyav).mean(axis=(1, 2, 3))
        if crop is None or crop[2:] == size:
            assert difference.max() == 0, (start, difference)
        else:
            assert difference.max() < 8, (start, difference)
    with pytest.raises(ValueError, match="video ends early"):
        decode_frames_torchcodec(path, 10.0, config)


def test_torchcodec_decoder_is_optional(monkeypatch, synthetic):
    from avidfast.data import cpu_pipeline

    monkeypatch.setattr(cpu_pipeline, "torchcodec_error", lambda: "torchcodec unavailable: ImportError: none")
    with pytest.raises(ValueError, match="torchcodec unavailable.*decoder='pyav'"):
        ClipDataset(read_manifest(synthetic), decoder="torchcodec")
    assert ClipDataset(read_manifest(synthetic)).frame_decoder is cpu_pipeline.video_ops.decode_frames  # default
    with pytest.raises(ValueError, match="decoder must be one of"):
        ClipDataset(read_manifest(synthetic), decoder="opencv")
