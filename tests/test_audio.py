"""Audio pre-processing: spectrogram presets, windows, decoding, statistics."""
import os

import numpy as np
import pytest
import torch
from media import make_clip

from avidfast.bench.loader_baseline import numpy_log_spectrogram
from avidfast.data import audio
from avidfast.data.manifest import write_manifest, read_manifest
from avidfast.data.stats import compute_stats


@pytest.mark.parametrize("name, bins, frames", [("table5", 129, 100), ("table6", 257, 200)])
def test_presets_give_the_tables_shapes(name, bins, frames):
    preset = audio.get_preset(name)
    assert (preset.bins, preset.frames, preset.seconds, preset.sample_rate) == (bins, frames, 2.0, 24000)
    wave = torch.randn(3, preset.samples)
    assert audio.log_spectrogram(wave, preset).shape == (3, bins, frames)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="table5, table6"):
        audio.get_preset("table7")


@pytest.mark.parametrize("name", ["table5", "table6"])
@pytest.mark.parametrize("seconds", [1.4, 2.0, 2.8])
def test_torch_spectrogram_equals_a_numpy_fft(name, seconds):
    preset = audio.get_preset(name)
    wave = torch.randn(int(seconds * preset.sample_rate)) * 0.3
    ours = audio.to_db(audio.power_spectrogram(wave, preset))
    ref = numpy_log_spectrogram(wave.double().numpy(), preset)
    assert ours.shape == ref.shape == (preset.bins, int(seconds * preset.sample_rate) // preset.hop_length)
    # float32 FFT rounding: tight where the bin is within 60 dB of its frame's peak, looser in notches
    strong = ref >= ref.max(axis=0, keepdims=True) - 60
    np.testing.assert_allclose(ours.numpy()[strong], ref[strong], atol=2e-3)
    np.testing.assert_allclose(ours.numpy(), ref, atol=0.1)


def test_resize_frames_is_linear_with_half_pixel_centres():
    spec = torch.randn(5, 140, dtype=torch.float64)
    out = audio.resize_frames(spec, 100)
    src = np.clip((np.arange(100) + 0.5) * 140 / 100 - 0.5, 0, 139)
    ref = np.stack([np.interp(src, np.arange(140), row) for row in spec.numpy()])
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


def test_gain_shifts_the_log_spectrogram_by_its_decibels():
    preset = audio.get_preset("table5")
    wave = torch.randn(preset.samples)
    plain = audio.log_spectrogram(wave, preset)
    louder = audio.log_spectrogram(wave, preset, gain=1.1)
    # float32 FFT rounding moves a bin by about its depth below the frame's strongest bins: bins within
    # 40 dB of the maximum (over 90% of them) agree to 1e-3 dB; the rare deep notches of random noise
    # (300 draws: up to 0.2 dB) are only required to follow the median
    shift = torch.full_like(plain, 20 * np.log10(1.1))
    strong = plain > plain.max() - 40
    assert strong.float().mean() > 0.9
    torch.testing.assert_close((louder - plain)[strong], shift[strong], atol=1e-3, rtol=0)
    assert abs(float((louder - plain).median()) - 20 * np.log10(1.1)) < 1e-3
    assert (louder - plain - 20 * np.log10(1.1)).abs().median() < 1e-4


def test_normalisation_uses_the_stats():
    preset = audio.get_preset("table5")
    mean, std = torch.randn(preset.bins), torch.rand(preset.bins) + 0.5
    stats = audio.SpectrogramStats("table5", mean, std, 10)
    wave = torch.randn(preset.samples)
    raw = audio.log_spectrogram(wave, preset)
    torch.testing.assert_close(audio.log_spectrogram(wave, preset, stats=stats), (raw - mean[:, None]) / (std[:, None] + 1e-5))


def test_train_windows_respect_the_supplement_ranges():
    jitter = audio.AudioJitter()
    generator = torch.Generator().manual_seed(3)
    for _ in range(500):
        video_start = float(torch.rand(()) * 7)
        window = audio.train_window(video_start, jitter, generator, file_duration=10.0)
        assert 1.4 <= window.duration <= 2.8 and 0.9 <= window.gain <= 1.1
        assert 0 <= window.start and window.start + window.duration <= 10.0 + 1e-9
        if 0.5 <= video_start <= 10.0 - 2.8 - 0.5:  # room on both sides: no clamping
            assert abs(window.start - video_start) <= 0.5
    window = audio.eval_window(9.5, audio.get_preset("table5"), file_duration=10.0)
    assert (window.start, window.duration, window.gain) == (8.0, 2.0, 1.0)


def _chirp_clip(path, sample_rate, channels):
    """A clip whose audio is a pure tone that starts at exactly 1.0 s (silence before)."""
    return make_clip(path, seconds=3.0, sample_rate=sample_rate, channels=channels, seed=1)


@pytest.mark.parametrize("sample_rate, channels", [(24000, 1), (44100, 2), (44100, 6), (11025, 2)])
def test_decode_audio_downmixes_and_resamples_to_24k(tmp_path, sample_rate, channels):
    path = _chirp_clip(str(tmp_path / "clip.mp4"), sample_rate, channels)
    wave = audio.decode_audio(path, 0.5, 2.0)
    assert wave.shape == (48000,) and wave.dtype == torch.float32
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    level = lambda hz: spectrum[int(round(hz * 2))]  # noqa: E731 - bin width is 0.5 Hz
    # make_clip's channel c is a sine at 350 * (c + 1) Hz (seed 1): the mono mix must hold the
    # first (left) and, with two or more channels, the second (right) channel's tone.
    tones = [350 * (c + 1) for c in range(min(channels, 2))]
    assert all(level(hz) > 0.1 * spectrum.max() for hz in tones)
    assert level(5000) < 0.01 * spectrum.max()  # and nothing that was not in the file
    assert wave.abs().max() < 1.5


def test_decode_audio_reads_from_the_right_time(tmp_path):
    import av
    from fractions import Fraction

    path = str(tmp_path / "click.wav")
    rate = 24000
    signal = np.zeros(3 * rate, np.float32)
    signal[int(1.7 * rate)] = 0.9  # one click at 1.7 s
    with av.open(path, "w") as container:
        stream = container.add_stream("pcm_f32le", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(signal[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    wave = audio.decode_audio(path, 1.2, 1.0)
    assert int(wave.abs().argmax()) == int(0.5 * rate)
    with pytest.raises(ValueError, match="audio ends early"):
        audio.decode_audio(path, 2.5, 1.0)


def test_running_stats_equal_the_direct_mean_and_std():
    chunks = [torch.randn(7, n, dtype=torch.float64) * 3 + 1 for n in (5, 40, 13)]
    running = audio.RunningStats(7)
    running.add(chunks[0])
    other = audio.RunningStats(7)
    other.add(chunks[1])
    other.add(chunks[2])
    running.merge(other)
    stats = running.result("table5")
    full = torch.cat(chunks, dim=1)
    torch.testing.assert_close(stats.mean, full.mean(1).float())
    torch.testing.assert_close(stats.std, full.std(1).float())
    assert stats.count == 58


def test_stats_file_round_trip_and_preset_check(tmp_path):
    stats = audio.SpectrogramStats("table5", torch.randn(129), torch.rand(129), 99)
    stats.save(str(tmp_path / "s.npz"))
    back = audio.SpectrogramStats.load(str(tmp_path / "s.npz"), audio.get_preset("table5"))
    torch.testing.assert_close(back.mean, stats.mean)
    with pytest.raises(ValueError, match="not 'table6'"):
        audio.SpectrogramStats.load(str(tmp_path / "s.npz"), audio.get_preset("table6"))
    (tmp_path / "bad.npz").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="bad.npz: cannot read"):
        audio.SpectrogramStats.load(str(tmp_path / "bad.npz"))


def test_compute_stats_over_a_manifest(tmp_path):
    paths = [make_clip(str(tmp_path / f"c{i}.mp4"), seconds=2.0, seed=i) for i in range(3)]
    (tmp_path / "broken.mp4").write_text("not a video")
    write_manifest(str(tmp_path / "m.csv"), [{"path": os.path.basename(p)} for p in paths] + [{"path": "broken.mp4"}])
    preset = audio.get_preset("table5")
    stats, failed = compute_stats(read_manifest(str(tmp_path / "m.csv")), preset, workers=0, progress=False)
    assert failed == 1
    specs = [audio.to_db(audio.power_spectrogram(audio.decode_audio(p, 0, 2.0), preset)) for p in paths]
    full = torch.cat(specs, dim=1).double()
    torch.testing.assert_close(stats.mean, full.mean(1).float(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats.std, full.std(1).float(), rtol=1e-4, atol=1e-3)


def test_compute_stats_reads_the_audio_streams_duration(tmp_path):
    """The audio (2 s) is shorter than the container (3 s, the video's): stats read the audio stream's
    duration (avidfast.data.probe's rule), not the container's, which would run 1 s past its end."""
    path = make_clip(str(tmp_path / "c.mp4"), seconds=2.0, frame_times=[i / 16 for i in range(48)], seed=3)
    write_manifest(str(tmp_path / "m.csv"), [{"path": "c.mp4"}])
    preset = audio.get_preset("table5")
    stats, failed = compute_stats(read_manifest(str(tmp_path / "m.csv")), preset, workers=0, progress=False)
    assert failed == 0
    spec = audio.to_db(audio.power_spectrogram(audio.decode_audio(path, 0, 2.0), preset)).double()
    torch.testing.assert_close(stats.mean, spec.mean(1).float(), rtol=1e-4, atol=1e-3)
