"""The `reference` audio preset (the released checkpoints' spectrogram) and the evaluation video transform."""
import numpy as np
import pytest
import torch

from avidfast.data import video
from avidfast.data.audio import SpectrogramStats, get_preset, log_spectrogram


def numpy_reference_spectrogram(wave: np.ndarray, mean=None, std=None, n_fft=512, hop=240, frames=200,
                                top_db=100.0) -> np.ndarray:
    """The steps of the reference's LogSpectrogram (librosa 0.7 defaults), in float64 numpy.

    STFT of 2 * n_fft samples: periodic Hann window of that length, frames centred on multiples of
    hop (reflect padding by half a frame), |X|^2; bin 0 kept, bins 1.. averaged in pairs; the first
    `frames` frames; 10 log10(max(S, 1e-10)) floored top_db below its maximum; (x - mean) / (std + 1e-5).
    """
    size = 2 * n_fft
    padded = np.pad(wave.astype(np.float64), size // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / size)
    count = 1 + wave.size // hop
    stack = np.stack([padded[i * hop: i * hop + size] * window for i in range(count)], axis=1)
    power = np.abs(np.fft.rfft(stack, axis=0)) ** 2
    power = np.concatenate([power[:1], power[1:].reshape(n_fft // 2, 2, -1).mean(1)], 0)[:, :frames]
    db = 10 * np.log10(np.maximum(power, 1e-10))
    db = np.maximum(db, db.max() - top_db)
    if mean is not None:
        db = (db - mean[:, None]) / (std[:, None] + 1e-5)
    return db


def _test_wave(rng: np.random.Generator) -> np.ndarray:
    """2 s at 24 kHz: a loud noisy tone, then near-silence far below the 100 dB floor."""
    t = np.arange(48000) / 24000
    loud = rng.uniform(0.2, 0.9) * np.sin(2 * np.pi * rng.uniform(200, 4000) * t) + 0.3 * rng.standard_normal(t.size)
    quiet = 1e-7 * rng.standard_normal(t.size)
    cut = int(rng.integers(18000, 30000))
    return np.where(np.arange(t.size) < cut, loud, quiet).astype(np.float32)


def _assert_relative(ours: np.ndarray, theirs: np.ndarray, rtol: float = 1e-4) -> None:
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * np.abs(theirs).max())


def test_reference_preset_matches_an_independent_numpy_implementation():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    preset = get_preset("reference")
    framing = (preset.bins, preset.frames, preset.fft_size, preset.hop_length, preset.sample_rate)
    assert framing == (257, 200, 1024, 240, 24000)
    wave = _test_wave(rng)
    theirs_db = numpy_reference_spectrogram(wave)
    floored = np.isclose(theirs_db, theirs_db.max() - 100)
    assert 0.2 < floored.mean() < 0.8  # the floor is exercised, not everywhere
    ours_db = log_spectrogram(torch.from_numpy(wave), preset).numpy()
    assert ours_db.shape == (257, 200)
    _assert_relative(ours_db, theirs_db)
    mean = rng.normal(-30, 10, 257).astype(np.float32)
    std = rng.uniform(5, 20, 257).astype(np.float32)
    stats = SpectrogramStats("reference", torch.from_numpy(mean), torch.from_numpy(std), 1)
    ours = log_spectrogram(torch.from_numpy(wave), preset, stats=stats).numpy()
    _assert_relative(ours, numpy_reference_spectrogram(wave, mean.astype(np.float64), std.astype(np.float64)))


def test_reference_preset_floors_each_example_of_a_batch_separately():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    waves = np.stack([_test_wave(rng), 1e-3 * _test_wave(rng)])
    batch = log_spectrogram(torch.from_numpy(waves), get_preset("reference")).numpy()
    for one, wave in zip(batch, waves):
        _assert_relative(one, numpy_reference_spectrogram(wave))


def test_table6_is_not_the_reference_spectrogram():
    wave = torch.from_numpy(_test_wave(np.random.default_rng(int(torch.randint(0, 2**31, ())))))
    table6, reference = log_spectrogram(wave, get_preset("table6")), log_spectrogram(wave, get_preset("reference"))
    assert table6.shape == reference.shape and (table6 - reference).abs().max() > 1.0


def test_reference_statistics_files_load_for_the_reference_preset(tmp_path):
    mean, std = np.random.default_rng(int(torch.randint(0, 2**31, ()))).normal(size=(2, 257)).astype(np.float32)
    path = tmp_path / "audio-spectDB-24k-norm-stats.npz"
    np.savez(path, mean=mean, std=np.abs(std))
    stats = SpectrogramStats.load(str(path), get_preset("reference"))
    assert stats.preset == "reference" and stats.count == 0 and np.array_equal(stats.mean.numpy(), mean)
    with pytest.raises(ValueError, match="257 bins.*'table5' \\(129 bins\\)"):
        SpectrogramStats.load(str(path), get_preset("table5"))


def test_cpu_pipeline_and_stats_compute_the_reference_preset_and_dali_refuses_it(tmp_path):
    from avidfast.data.cpu_pipeline import ClipDataset
    from avidfast.data.dali_pipeline import build_dali_loader
    from avidfast.data.manifest import read_manifest
    from avidfast.data.stats import compute_stats
    from avidfast.data.synthetic import make_dataset

    manifest = read_manifest(make_dataset(str(tmp_path / "set"), num_videos=2, num_classes=2, seconds=2.5, seed=5,
                                          size=(64, 48), workers=1))
    preset = get_preset("reference")
    stats, failed = compute_stats(manifest, preset, workers=0, progress=False)
    assert failed == 0 and stats.preset == "reference" and stats.mean.shape == (257,)
    dataset = ClipDataset(manifest, video=video.VideoConfig(frames=4, crop=32), audio_preset=preset, stats=stats,
                          mode="eval")
    clip = dataset.load(1, epoch=0, position=0)
    assert clip.audio.shape == (1, 257, 200) and bool(torch.isfinite(clip.audio).all())
    raw = ClipDataset(manifest, video=video.VideoConfig(frames=4, crop=32), audio_preset="reference", mode="eval")
    spec = raw.load(1, epoch=0, position=0).audio
    assert float(spec.min()) >= float(spec.max()) - 100 - 1e-3  # the dB floor
    with pytest.raises(ValueError, match="audio preset 'reference'.*CPU pipeline"):
        build_dali_loader(manifest, video=video.VideoConfig(), audio_preset="reference", stats=None, batch_size=2)


def test_reference_preset_is_a_config_and_cli_choice():
    from avidfast.cli import build_parser
    from avidfast.config import ConfigError, load_config

    table6 = ["model.preset=table6", "data.audio.preset=reference"]
    assert load_config("demo", table6).data.audio.preset == "reference"
    with pytest.raises(ConfigError, match="data.audio.preset=reference.*data.pipeline=cpu"):
        load_config("demo", table6 + ["data.pipeline=dali"])
    args = build_parser().parse_args(["stats", "m.csv", "--audio-preset", "reference"])
    assert args.audio_preset == "reference"


# The reference's evaluation transform (datasets/preprocessing.py VideoPrep_MSC_CJ, augment=False):
# Resize(int(crop / 0.875)) of the short side, long side int(size * long / short); CenterCrop at
# int(round((side - crop) / 2.)); ToTensor (/255); Normalize with the ImageNet mean and std.
REFERENCE_MEAN, REFERENCE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("crop", [112, 224])
def test_eval_resize_is_the_references_up_to_one_pixel_of_the_long_side(crop):
    short = int(crop / 0.875)
    for height, width in [(240, 320), (360, 480), (720, 1280), (480, 270), (1080, 1920), (300, 301)]:
        h, w = video.eval_size(height, width, crop)
        if height <= width:
            assert h == short and abs(w - int(short * width / height)) <= 1
        else:
            assert w == short and abs(h - int(short * height / width)) <= 1


def test_eval_transform_is_the_references_centre_crop_and_imagenet_normalisation():
    """Equal to the reference's, except that an odd margin whose half Python rounds up (x.5 to
    an even number) puts the reference's crop one pixel further than ours."""
    assert video.IMAGENET_MEAN == REFERENCE_MEAN and video.IMAGENET_STD == REFERENCE_STD
    assert video.EVAL_CROP_FRACTION == 0.875
    config = video.VideoConfig(frames=3, crop=112)
    shifted = 0
    for height, width in [(128, 170), (128, 228), (150, 128), (128, 171), (131, 128), (129, 128)]:
        frames = torch.randint(0, 256, (3, height, width, 3), dtype=torch.uint8).numpy()
        ours = video.eval_transform(frames, config).numpy()
        offsets = []
        for margin in (height - 112, width - 112):
            reference = int(round(margin / 2.0))
            rounds_up = reference - margin // 2
            shifted += rounds_up
            offsets.append(reference - rounds_up)
        top, left = offsets
        cut = frames[:, top: top + 112, left: left + 112].astype(np.float64) / 255
        theirs = ((cut - np.array(REFERENCE_MEAN)) / np.array(REFERENCE_STD)).transpose(3, 0, 1, 2)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert shifted == 2  # (128, 171) and (131, 128)
