"""The DALI pipeline on the CPU (device_id=None): batch contract, agreement of the audio path with
avidfast.data.audio, determinism, sharding and the errors for inputs DALI cannot read.

The test media are made here: VP9 clips in WebM (DALI's CPU decoder reads VP8/VP9/MJPEG only) whose
red level encodes the clip and whose green level encodes the frame number, and 24 kHz mono WAVs
with one tone per clip. The GPU path (mixed decoder, .gpu() placement) is not exercised here.
"""
import os
import sys
import wave

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
av = pytest.importorskip("av", reason="PyAV is needed to make the test videos")

from avidfast.data import dali_pipeline as dp  # noqa: E402
from avidfast.data.audio import (  # noqa: E402
    PRESETS, AudioJitter, RunningStats, log_spectrogram, power_spectrogram, to_db,
)
from avidfast.data.manifest import read_manifest, write_manifest  # noqa: E402
from avidfast.data.sampling import ShardedEpochSampler  # noqa: E402
from avidfast.data.video import VideoConfig  # noqa: E402

NUM_CLIPS = 5
FPS = 16
SECONDS = 3
WIDTH, HEIGHT = 96, 72
SR = 24000
VIDEO = VideoConfig(frames=8, crop=32)


def _red(clip: int) -> int:
    return 40 + 40 * clip


def _green(frame: int) -> int:
    return 5 * frame


def _write_video(path: str, clip: int, codec: str = "libvpx-vp9", frames: int = FPS * SECONDS) -> None:
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "g": "16", "keyint_min": "16",
                              "lag-in-frames": "0", "crf": "10", "b": "0"}
        else:
            stream.options = {"g": "16", "preset": "ultrafast"}
        for i in range(frames):
            img = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            img[..., 0] = _red(clip)
            img[..., 1] = _green(i)
            img[..., 2] = 128
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_wav(path: str, clip: int) -> np.ndarray:
    """A tone per clip plus noise and a silent gap; returns the float32 samples DALI will decode."""
    rng = np.random.default_rng(clip)
    t = np.arange(SECONDS * SR) / SR
    x = 0.3 * np.sin(2 * np.pi * (300 + 200 * clip) * t) + 0.05 * rng.standard_normal(t.size)
    x[SR // 2: SR // 2 + 2000] = 0.0
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes(pcm.tobytes())
    return pcm.astype(np.float32) / 32768.0


def _read_wav(path: str) -> np.ndarray:
    with wave.open(path, "rb") as f:
        assert f.getframerate() == SR and f.getnchannels() == 1 and f.getsampwidth() == 2
        return np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_media")
    rows, waves = [], []
    for clip in range(NUM_CLIPS):
        _write_video(str(root / f"clip{clip}.webm"), clip)
        _write_wav(str(root / f"clip{clip}.wav"), clip)
        waves.append(_read_wav(str(root / f"clip{clip}.wav")))
        rows.append(dict(path=f"clip{clip}.webm", label=("cat", "dog")[clip % 2], duration=float(SECONDS),
                         fps=float(FPS), width=WIDTH, height=HEIGHT, audio_path=f"clip{clip}.wav"))
    write_manifest(str(root / "manifest.csv"), rows)
    return {"root": root, "manifest": read_manifest(str(root / "manifest.csv")), "waves": waves, "rows": rows}


def _stats(waves, preset):
    acc = RunningStats(preset.bins)
    for w in waves:
        acc.add(to_db(power_spectrogram(torch.from_numpy(w), preset)))
    return acc.result(preset.name)


def _loader(media, **kw):
    args = dict(video=VIDEO, audio_preset="table5", stats=None, batch_size=2, num_threads=1)
    args.update(kw)
    return dp.build_dali_loader(media["manifest"], **args)


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def _reference_audio(media, loader, plan, stats):
    """avidfast.data.audio.log_spectrogram on the same samples, the window zero-padded past the end."""
    wave_ = media["waves"][plan.index]
    window = np.zeros(plan.audio_samples, np.float32)
    piece = wave_[plan.audio_start: plan.audio_start + plan.audio_samples]
    window[: piece.size] = piece
    return log_spectrogram(torch.from_numpy(window), loader.preset, gain=plan.gain, stats=stats)


# ------------------------------------------------------------------------------------------------
# (a) the batch contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset_name", ["table5", "table6"])
def test_batch_contract(media, preset_name):
    preset = PRESETS[preset_name]
    loader = _loader(media, audio_preset=preset_name, stats=_stats(media["waves"], preset), batch_size=2, seed=3)
    assert len(loader) == NUM_CLIPS // 2
    batches = _epoch(loader, 1)
    assert len(batches) == len(loader)
    order = loader.epoch_order()
    labels = media["manifest"].label_indices()
    mean = torch.tensor(VIDEO.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(VIDEO.std).view(1, 3, 1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    seen = []
    for batch in batches:
        assert set(batch) == {"video", "audio", "index", "label"}
        assert batch["video"].shape == (2, 3, VIDEO.frames, VIDEO.crop, VIDEO.crop)
        assert batch["audio"].shape == (2, 1, preset.bins, preset.frames)
        assert batch["video"].dtype == torch.float32 and batch["audio"].dtype == torch.float32
        assert batch["index"].dtype == torch.int64 and batch["label"].dtype == torch.int64
        assert batch["index"].shape == (2,) and batch["label"].shape == (2,)
        assert (batch["video"] >= lo - 1e-5).all() and (batch["video"] <= hi + 1e-5).all()
        assert torch.isfinite(batch["audio"]).all()
        assert batch["audio"].abs().max() < 50  # Z-normalised
        assert batch["label"].tolist() == [labels[i] for i in batch["index"].tolist()]
        seen += batch["index"].tolist()
    assert seen == [index for _, index in order][: len(seen)]
    sampler = ShardedEpochSampler(NUM_CLIPS, seed=3, shuffle=True)
    sampler.set_epoch(1)
    assert order == list(sampler)


def test_without_labels_or_stats(media):
    manifest = media["manifest"]
    unlabelled = type(manifest)(root=manifest.root, rows=[{k: v for k, v in r.items() if k != "label"}
                                                         for r in manifest.rows],
                                columns=[c for c in manifest.columns if c != "label"])
    loader = dp.build_dali_loader(unlabelled, video=VIDEO, audio_preset="table5", stats=None, batch_size=4,
                                  num_threads=1, mode="eval")
    batch = next(iter(loader))
    assert set(batch) == {"video", "audio", "index"}
    assert batch["audio"].min() >= -100.001  # plain dB, floored at 10 log10(AMIN)


def test_eval_pairs_frames_and_content(media):
    """Eval mode decodes the planned frames of the right clip: red level = clip, green = frame."""
    loader = _loader(media, mode="eval", batch_size=NUM_CLIPS, drop_last=False)
    (batch,) = _epoch(loader)
    mean = torch.tensor(VIDEO.mean).view(3, 1)
    std = torch.tensor(VIDEO.std).view(3, 1)
    for j, (position, index) in enumerate(loader.epoch_order()):
        assert batch["index"][j] == index == position  # eval reads in manifest order
        plan = loader.plan(position, index)
        assert plan.augment is None and plan.gain == 1.0
        assert plan.audio_samples == loader.preset.samples
        assert plan.video_start == pytest.approx((SECONDS - VIDEO.seconds) / 2, abs=1 / FPS)  # middle clip
        # audio from the clip start, moved back so the window ends inside the file
        assert plan.audio_start == round(min(plan.video_start, SECONDS - loader.preset.seconds) * SR)
        assert list(plan.frames) == list(range(plan.frames[0], plan.frames[0] + VIDEO.frames))
        rgb = (batch["video"][j].reshape(3, VIDEO.frames, -1).mean(-1) * std + mean) * 255  # (3, T)
        assert torch.allclose(rgb[0], torch.full((VIDEO.frames,), float(_red(index))), atol=6)
        expected_green = torch.tensor([float(_green(f)) for f in plan.frames])
        assert torch.allclose(rgb[1], expected_green, atol=6)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_train_crop_and_flip_follow_the_plan(tmp_path, flip):
    """With colour jitter off, a training clip is the planned crop of the planned frames, resized
    (and mirrored): compared with PyAV's frames cropped and resized by torch."""
    h, w, n = 72, 96, 32
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    with av.open(str(tmp_path / "grad.webm"), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "g": "16", "lag-in-frames": "0", "crf": "4", "b": "0"}
        for i in range(n):
            img = np.stack([20 + 2 * xx, 20 + 3 * yy, np.full_like(xx, 60 + 4 * i)], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    _write_wav(str(tmp_path / "grad.wav"), 0)
    write_manifest(str(tmp_path / "m.csv"), [dict(path="grad.webm", duration=n / FPS, fps=float(FPS), width=w,
                                                  height=h, audio_path="grad.wav")] * 4)
    config = VideoConfig(frames=4, crop=32, flip=flip, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    loader = dp.build_dali_loader(str(tmp_path / "m.csv"), video=config, audio_preset="table5", stats=None,
                                  batch_size=4, num_threads=1, seed=2)
    (batch,) = _epoch(loader)
    with av.open(str(tmp_path / "grad.webm")) as container:
        decoded = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))
    mean = torch.tensor(config.mean).view(3, 1, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1, 1)
    for j, (position, index) in enumerate(loader.epoch_order()):
        plan = loader.plan(position, index)
        assert plan.augment.flip == bool(flip)
        top, left, ch, cw = plan.augment.crop
        clip = decoded[list(plan.frames), top: top + ch, left: left + cw].permute(0, 3, 1, 2).float()
        want = torch.nn.functional.interpolate(clip, size=(32, 32), mode="bilinear", align_corners=False,
                                               antialias=True).permute(1, 0, 2, 3)  # (3, T, 32, 32)
        if flip:
            want = want.flip(-1)
        got = (batch["video"][j] * std + mean) * 255
        assert (got - want).abs().mean() < 2.0, (got - want).abs().mean()


# ------------------------------------------------------------------------------------------------
# (b) the DALI spectrogram equals avidfast.data.audio.log_spectrogram
# ------------------------------------------------------------------------------------------------


# Both sides compute a float32 FFT: bins far below their frame's peak (deep spectral notches, > 60 dB
# down) carry rounding errors of a few 0.01 dB in either implementation (measured against a float64
# STFT, DALI's are no larger than torch's), so the tight tolerance applies to the other bins and a
# loose one, in dB, to all.
WELL_CONDITIONED_DB = 60.0
TIGHT = 1e-3  # normalised units, bins within 60 dB of the frame peak
LOOSE_DB = 0.1  # dB, every bin


def _compare(dali, ref, ref_db, stats):
    """(max error on well-conditioned bins in output units, max error anywhere in dB)."""
    good = ref_db >= ref_db.max(0, keepdim=True).values - WELL_CONDITIONED_DB
    err = (dali - ref).abs()
    err_db = err * (stats.std[:, None] + 1e-5) if stats is not None else err
    return err[good].max().item(), err_db.max().item()


@pytest.mark.parametrize("preset_name", ["table5", "table6"])
def test_audio_matches_torch_unjittered(media, preset_name):
    preset = PRESETS[preset_name]
    stats = _stats(media["waves"], preset)
    worst = {}
    for use_stats in (stats, None):
        loader = _loader(media, audio_preset=preset_name, stats=use_stats, mode="eval", batch_size=NUM_CLIPS,
                         drop_last=False)
        (batch,) = _epoch(loader)
        tight, loose = 0.0, 0.0
        for j, (position, index) in enumerate(loader.epoch_order()):
            plan = loader.plan(position, index)
            assert plan.audio_samples == preset.samples and plan.gain == 1.0
            ref = _reference_audio(media, loader, plan, use_stats)
            ref_db = _reference_audio(media, loader, plan, None)
            t, l_ = _compare(batch["audio"][j, 0], ref, ref_db, use_stats)
            tight, loose = max(tight, t), max(loose, l_)
        worst["normalised" if use_stats is not None else "dB"] = (tight, loose)
        assert tight < TIGHT and loose < LOOSE_DB
    print(f"{preset_name} un-jittered: max |DALI - torch| (bins within 60 dB of the peak, all bins in dB): {worst}")


@pytest.mark.parametrize("preset_name", ["table5", "table6"])
def test_audio_matches_torch_jittered(media, preset_name):
    """Jittered duration (time axis resized), gain and offset, in training mode."""
    preset = PRESETS[preset_name]
    stats = _stats(media["waves"], preset)
    loader = _loader(media, audio_preset=preset_name, stats=stats, mode="train", batch_size=NUM_CLIPS,
                     drop_last=False, seed=11, jitter=AudioJitter())
    tight, loose, resized = 0.0, 0.0, 0
    for epoch in range(2):
        (batch,) = _epoch(loader, epoch)
        for j, (position, index) in enumerate(loader.epoch_order()):
            assert batch["index"][j] == index
            plan = loader.plan(position, index)
            resized += plan.audio_samples != preset.samples
            ref = _reference_audio(media, loader, plan, stats)
            ref_db = _reference_audio(media, loader, plan, None)
            t, l_ = _compare(batch["audio"][j, 0], ref, ref_db, stats)
            tight, loose = max(tight, t), max(loose, l_)
    print(f"{preset_name} jittered: max |DALI - torch| = {tight:.2e} normalised (bins within 60 dB of the peak), "
          f"{loose:.2e} dB (all bins)")
    assert resized >= 8
    assert tight < TIGHT and loose < LOOSE_DB


def test_audio_fixed_jitter_in_train_mode(media):
    """Train mode with the jitter fixed (gain 1, duration preset.seconds, no offset) equals the
    un-jittered spectrogram of the window starting at the clip's first frame."""
    preset = PRESETS["table5"]
    fixed = AudioJitter(volume=(1.0, 1.0), max_offset=0.0, duration=(preset.seconds, preset.seconds))
    loader = _loader(media, stats=None, batch_size=NUM_CLIPS, drop_last=False, seed=5, jitter=fixed)
    (batch,) = _epoch(loader)
    for j, (position, index) in enumerate(loader.epoch_order()):
        plan = loader.plan(position, index)
        assert plan.gain == 1.0 and plan.audio_samples == preset.samples
        assert plan.audio_start == round(min(plan.video_start, SECONDS - preset.seconds) * SR)
        wave_ = torch.from_numpy(media["waves"][index][plan.audio_start: plan.audio_start + preset.samples].copy())
        assert (batch["audio"][j, 0] - log_spectrogram(wave_, preset)).abs().max() < LOOSE_DB


# ------------------------------------------------------------------------------------------------
# (c) evaluation is deterministic, (d) training varies with seed and epoch but is reproducible
# ------------------------------------------------------------------------------------------------


def _by_index(batches, key="video"):
    return {int(i): b[key][j] for b in batches for j, i in enumerate(b["index"])}


def test_eval_deterministic(media):
    first = _epoch(_loader(media, mode="eval", batch_size=2, drop_last=False, seed=1))
    loader = _loader(media, mode="eval", batch_size=2, drop_last=False, seed=2)
    second, third = _epoch(loader, 0), _epoch(loader, 4)
    assert len(first) == len(second) == len(third) == 3
    for a, b, c in zip(first, second, third):
        for key in a:
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key


def test_train_varies_with_seed_and_epoch(media):
    def run(seed, epoch):
        return _epoch(_loader(media, seed=seed, batch_size=NUM_CLIPS, drop_last=False), epoch)

    base = run(7, 0)
    again = run(7, 0)
    for a, b in zip(base, again):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    for other in (run(8, 0), run(7, 1)):
        va, vb = _by_index(base), _by_index(other)
        aa, ab = _by_index(base, "audio"), _by_index(other, "audio")
        assert sum(not torch.equal(va[i], vb[i]) for i in va) >= NUM_CLIPS - 1
        assert sum(not torch.equal(aa[i], ab[i]) for i in aa) >= NUM_CLIPS - 1


def test_epochs_can_be_abandoned(media):
    loader = _loader(media, mode="train", batch_size=1, seed=9)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)  # stop after one batch; the next epoch must start cleanly
    full = _epoch(loader, 1)
    assert [int(b["index"]) for b in full] == [i for _, i in loader.epoch_order()]


# ------------------------------------------------------------------------------------------------
# (e) sharding
# ------------------------------------------------------------------------------------------------


def test_sharding_disjoint_and_covering(media):
    positions, indices = [], []
    for rank in range(2):
        loader = _loader(media, rank=rank, world_size=2, batch_size=1, seed=4)
        batches = _epoch(loader, 2)
        order = loader.epoch_order()
        assert len(batches) == len(loader) == 3  # 5 samples padded to 6 over 2 ranks
        assert [int(b["index"]) for b in batches] == [i for _, i in order]
        positions.append({p for p, _ in order})
        indices += [i for _, i in order]
    assert not positions[0] & positions[1]
    assert positions[0] | positions[1] == set(range(6))
    assert set(indices) == set(range(NUM_CLIPS))


@pytest.fixture(scope="module")
def shards(media, tmp_path_factory):
    """The media's clips as tar shards of about two samples each."""
    from avidfast.data.shards.index import read_index
    from avidfast.data.shards.writer import write_shards

    folder = str(tmp_path_factory.mktemp("dali_shards"))
    manifest = media["manifest"]
    largest = max(os.path.getsize(manifest.path(i)) + os.path.getsize(manifest.audio_path(i)) for i in range(NUM_CLIPS))
    write_shards(manifest, folder, shard_bytes=2 * largest + 8192)
    index = read_index(folder)
    assert len(index.shards) >= 3
    return folder


def _shard_loader(folder, **kw):
    from avidfast.data.shards.index import read_index

    args = dict(video=VIDEO, audio_preset="table5", stats=None, batch_size=1, num_threads=1)
    args.update(kw)
    return dp.build_dali_loader(read_index(folder), **args)


def test_shards_give_the_same_clips_as_the_files(media, shards):
    files = _epoch(_loader(media, mode="eval", batch_size=NUM_CLIPS, drop_last=False))
    batches = _epoch(_shard_loader(shards, mode="eval", batch_size=NUM_CLIPS, drop_last=False))
    for key in ("video", "audio"):
        from_files, from_shards = _by_index(files, key), _by_index(batches, key)
        assert sorted(from_shards) == list(range(NUM_CLIPS))
        for slot in range(NUM_CLIPS):
            assert torch.equal(from_files[slot], from_shards[slot]), (key, slot)
    labels = dict(zip(batches[0]["index"].tolist(), batches[0]["label"].tolist()))
    assert all(labels[slot] == slot % 2 for slot in labels)  # cat, dog, cat, ... from each sample's JSON


def test_shards_every_slot_over_two_ranks_and_exact_resume(shards):
    seen = []
    for rank in range(2):
        loader = _shard_loader(shards, rank=rank, world_size=2, seed=4)
        batches = _epoch(loader, 2)
        assert len(batches) == 3  # 5 samples padded to 6 over 2 ranks
        seen += [int(b["index"]) for b in batches]
        resumed = _shard_loader(shards, rank=rank, world_size=2, seed=4)
        resumed.set_epoch(2, skip_batches=1)
        rest = list(resumed)
        assert len(rest) == 2
        for a, b in zip(batches[1:], rest):
            for key in a:
                assert torch.equal(a[key], b[key]), key
    assert set(seen) == set(range(NUM_CLIPS)) and len(seen) == 6


def test_shards_corrupt_member_is_replaced_and_missing_shard_named(shards, tmp_path):
    import shutil

    from avidfast.data.shards.index import ShardError, read_index

    folder = str(tmp_path / "shards")
    shutil.copytree(shards, folder)
    index = read_index(folder)
    victim = index.samples[0]
    offset, size = victim.members["webm"]
    with open(index.shard_path(victim.shard), "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    loader = _shard_loader(folder, mode="eval", batch_size=NUM_CLIPS, drop_last=False, max_bad_fraction=0.5)
    (batch,) = _epoch(loader)
    assert victim.slot not in batch["index"].tolist()
    assert list(loader.bad_files) == [f"{index.shard_path(victim.shard)}:{victim.key}.webm"]
    os.unlink(index.shard_path(1))
    with pytest.raises(ShardError, match=f"shard {index.shard_path(1)} .*missing"):
        read_index(folder)


def test_dalis_webdataset_reader_reads_the_shards(shards, media):
    import json

    from nvidia.dali import fn, pipeline_def

    from avidfast.data.shards.index import read_index

    index = read_index(shards)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=[index.shard_path(i) for i in range(len(index.shards))],
                                           ext=["webm", "wav", "json"], missing_component_behavior="error"))

    pipe = read()
    pipe.build()
    contents = {}
    for _ in range(NUM_CLIPS):
        video, audio, meta = (np.array(out.at(0)).tobytes() for out in pipe.run())
        contents[json.loads(meta)["index"]] = (video, audio)
    manifest = media["manifest"]
    assert sorted(contents) == list(range(NUM_CLIPS))
    for slot, (video, audio) in contents.items():
        with open(manifest.path(slot), "rb") as f:
            assert f.read() == video
        with open(manifest.audio_path(slot), "rb") as f:
            assert f.read() == audio


# ------------------------------------------------------------------------------------------------
# (f) inputs DALI cannot read
# ------------------------------------------------------------------------------------------------


def test_h264_on_cpu_is_a_clear_error(media, tmp_path):
    if "libx264" not in av.codecs_available:
        pytest.skip("PyAV has no libx264 encoder")
    _write_video(str(tmp_path / "h264.mp4"), 0, codec="libx264")
    _write_wav(str(tmp_path / "h264.wav"), 0)
    write_manifest(str(tmp_path / "m.csv"), [dict(path="h264.mp4", duration=3.0, fps=16.0, width=WIDTH,
                                                  height=HEIGHT, audio_path="h264.wav")] * 2)
    loader = dp.build_dali_loader(str(tmp_path / "m.csv"), video=VIDEO, audio_preset="table5", stats=None,
                                  batch_size=2, num_threads=1)
    with pytest.raises(dp.DaliInputError, match=r"h264\.mp4.*'h264'.*CPU.*--transcode vp9"):
        next(iter(loader))


def test_missing_audio_path_is_a_clear_error(media, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "audio_path"} for r in media["rows"]]
    write_manifest(str(tmp_path / "m.csv"), rows)
    with pytest.raises(dp.DaliInputError, match=r"clip0\.webm.*no audio_path.*--extract-audio wav"):
        dp.build_dali_loader(str(tmp_path / "m.csv"), video=VIDEO, audio_preset="table5", stats=None, batch_size=2)
    rows = [dict(r, audio_path=r["path"]) for r in media["rows"]]  # audio left in the video container
    write_manifest(str(tmp_path / "m2.csv"), rows)
    with pytest.raises(dp.DaliInputError, match=r"not WAV/FLAC/OGG"):
        dp.build_dali_loader(str(tmp_path / "m2.csv"), video=VIDEO, audio_preset="table5", stats=None, batch_size=2)


def test_missing_files_are_replaced_and_counted(media, tmp_path):
    rows = [dict(r, path=os.path.join(str(media["root"]), r["path"]),
                 audio_path=os.path.join(str(media["root"]), r["audio_path"])) for r in media["rows"]]
    rows[2]["path"] = str(tmp_path / "gone.webm")
    (tmp_path / "empty.wav").write_bytes(b"")
    rows[4]["audio_path"] = str(tmp_path / "empty.wav")
    write_manifest(str(tmp_path / "m.csv"), rows)
    loader = dp.build_dali_loader(str(tmp_path / "m.csv"), video=VIDEO, audio_preset="table5", stats=None,
                                  batch_size=NUM_CLIPS, drop_last=False, num_threads=1, max_bad_fraction=0.5)
    first = _epoch(loader)
    indices = first[0]["index"].tolist()
    assert len(indices) == NUM_CLIPS and 2 not in indices and 4 not in indices
    assert set(loader.bad_files) == {str(tmp_path / "gone.webm"), str(tmp_path / "empty.wav")}
    assert loader.bad_reads >= 2  # a replacement can itself be bad and be replaced again
    again = _epoch(dp.build_dali_loader(str(tmp_path / "m.csv"), video=VIDEO, audio_preset="table5", stats=None,
                                        batch_size=NUM_CLIPS, drop_last=False, num_threads=1, max_bad_fraction=0.5))
    assert again[0]["index"].tolist() == indices  # replacements are deterministic
    strict = dp.build_dali_loader(str(tmp_path / "m.csv"), video=VIDEO, audio_preset="table5", stats=None,
                                  batch_size=NUM_CLIPS, drop_last=False, num_threads=1, max_bad_fraction=0.1)
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        _epoch(strict)


def test_undecodable_file_without_probe_names_the_file(media, tmp_path):
    """validate='exists' lets a garbage file through; DALI's decoder then kills the pipeline, and the
    loader says which files were in flight. validate='probe' replaces it instead."""
    rows = [dict(r, path=os.path.join(str(media["root"]), r["path"]),
                 audio_path=os.path.join(str(media["root"]), r["audio_path"])) for r in media["rows"]]
    (tmp_path / "garbage.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, np.uint8).tobytes())
    rows[1]["path"] = str(tmp_path / "garbage.webm")
    write_manifest(str(tmp_path / "m.csv"), rows)
    args = dict(video=VIDEO, audio_preset="table5", stats=None, batch_size=NUM_CLIPS, drop_last=False,
                num_threads=1, mode="eval")
    loader = dp.build_dali_loader(str(tmp_path / "m.csv"), validate="exists", **args)
    with pytest.raises(RuntimeError, match=r"could not decode.*garbage\.webm"):
        _epoch(loader)
    probed = dp.build_dali_loader(str(tmp_path / "m.csv"), validate="probe", max_bad_fraction=0.5, **args)
    (batch,) = _epoch(probed)
    assert 1 not in batch["index"].tolist() and str(tmp_path / "garbage.webm") in probed.bad_files


def test_frame_indices_resample_other_frame_rates():
    config = VideoConfig(frames=4, fps=16.0)
    assert dp.frame_indices(0.5, config, 16.0).tolist() == [8, 9, 10, 11]
    assert dp.frame_indices(0.5, config, 30.0).tolist() == [15, 16, 18, 20]  # 15 + floor(k * 30 / 16)
    assert dp.frame_indices(0.0, config, 8.0).tolist() == [0, 0, 1, 1]


def test_missing_dali_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"pip install avidfast\[dali\].*nvidia-dali"):
        dp.require_dali()
    assert not dp.dali_available()


# ------------------------------------------------------------------------------------------------
# (f) the batch contract on the synthetic demo set and on real clips, beside the CPU pipeline
# ------------------------------------------------------------------------------------------------


def _prepared_for_dali(src_manifest: str, out: str):
    """``avidfast prepare --transcode vp9 --extract-audio wav`` of src_manifest into out (resumable)."""
    from avidfast.data.prepare import prepare

    prepare(src_manifest, out, workers=2, extract_audio="wav", transcode="vp9", progress=False)
    manifest = read_manifest(os.path.join(out, "manifest.csv"))
    assert len(manifest) and all(r["audio_path"] for r in manifest.rows)
    return manifest


def _both_pipelines_contract(manifest, video: VideoConfig, preset_name: str, batch_size: int) -> None:
    """The DALI (CPU mode) and CPU pipelines on the same prepared files: same keys, shapes, dtypes and
    value ranges, labels that follow the index, and every row read once per epoch."""
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader

    preset = PRESETS[preset_name]
    mean = torch.tensor(video.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(video.std).view(1, 3, 1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    dali = dp.build_dali_loader(manifest, video=video, audio_preset=preset_name, stats=None,
                                batch_size=batch_size, num_threads=2, seed=1)
    dali.set_epoch(0)
    cpu = CPULoader(ClipDataset(manifest, video=video, audio_preset=preset_name, seed=1), batch_size=batch_size,
                    workers=0)
    labels = manifest.label_indices() if manifest.has_labels else None
    for name, loader in (("dali", dali), ("cpu", cpu)):
        batches = list(loader)
        assert len(batches) == len(manifest) // batch_size, name
        seen = []
        for batch in batches:
            keys = {"video", "audio", "index"} | ({"label"} if labels is not None else set())
            assert set(batch) == keys, (name, set(batch))
            assert batch["video"].shape == (batch_size, 3, video.frames, video.crop, video.crop), name
            assert batch["audio"].shape == (batch_size, 1, preset.bins, preset.frames), name
            assert batch["video"].dtype == batch["audio"].dtype == torch.float32, name
            assert batch["index"].dtype == torch.int64, name
            assert (batch["video"] >= lo - 1e-4).all() and (batch["video"] <= hi + 1e-4).all(), name
            assert batch["video"].std() > 0.05, name  # pictures, not a constant
            assert torch.isfinite(batch["audio"]).all() and batch["audio"].std() > 1, name  # dB, unnormalised
            if labels is not None:
                assert batch["label"].tolist() == [labels[i] for i in batch["index"].tolist()], name
            seen += batch["index"].tolist()
        assert len(set(seen)) == len(seen) == len(batches) * batch_size, name


def test_synthetic_set_gives_the_contract_in_both_pipelines(tmp_path):
    from avidfast.data.synthetic import make_dataset

    src = make_dataset(str(tmp_path / "syn"), num_videos=6, num_classes=3, seconds=2.0, seed=5, size=(96, 72),
                       workers=1)
    manifest = _prepared_for_dali(src, str(tmp_path / "prep"))
    assert len(manifest) == 6 and manifest.has_labels
    _both_pipelines_contract(manifest, VideoConfig(frames=8, crop=64), "table5", batch_size=3)


def test_real_clips_give_the_contract_in_both_pipelines():
    from media import media_cache, real_clips

    src = real_clips()
    if src is None:
        pytest.skip("real media (Big Buck Bunny) is not in the cache: run `python scripts/fetch_media.py`")
    # VP9 at 720p takes a while to encode: the prepared copies stay in the media cache (prepare resumes).
    manifest = _prepared_for_dali(src, os.path.join(media_cache(), "bbb_clips_vp9_prepared"))
    _both_pipelines_contract(manifest, VideoConfig(frames=16, crop=112), "table6", batch_size=len(manifest))


def test_clips_lie_within_the_video_stream_when_the_audio_is_longer(tmp_path):
    """Without metadata in the manifest, the clip range is the video stream's duration (2 s), not the
    container's (4 s, the audio's): avidfast.data.probe's rule, the same as the CPU pipeline's."""
    from media import make_clip

    make_clip(str(tmp_path / "a.mp4"), seconds=4.0, frame_times=[i / FPS for i in range(2 * FPS)], seed=13)
    _write_wav(str(tmp_path / "a.wav"), 0)
    write_manifest(str(tmp_path / "m.csv"), [dict(path="a.mp4", audio_path="a.wav")])
    args = dict(video=VIDEO, audio_preset="table5", stats=None, batch_size=1, validate="exists")  # plans only
    loader = dp.build_dali_loader(str(tmp_path / "m.csv"), mode="eval", **args)
    plan = loader.plan(0, 0)
    assert plan.video_start == pytest.approx((2.0 - VIDEO.seconds) / 2, abs=1 / FPS)  # not 1.75 s
    assert max(plan.frames) < 2 * FPS
    loader.close()
    loader = dp.build_dali_loader(str(tmp_path / "m.csv"), mode="train", **args)
    assert max(max(loader.plan(position, 0).frames) for position in range(12)) < 2 * FPS
    loader.close()
