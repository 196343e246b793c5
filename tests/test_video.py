"""Video pre-processing: frame choice, crops, colour jitter, evaluation transform."""
import colorsys
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avidfast.data import video
from avidfast.data.video import ClipAugment, VideoConfig


def _numbered_clip(path, fps=32, seconds=3.0, size=(96, 64), gop=48, bframes=3):
    """H.264 whose frame i is a flat grey of level 20 + 6 * (i % 36) with a white square, so the
    decoded grey tells which frame was returned; B-frames and a long GOP exercise seeking."""
    import av

    width, height = size
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "0", "g": str(gop), "bf": str(bframes)}
        for i in range(int(seconds * fps)):
            image = np.full((height, width, 3), 20 + 6 * (i % 36), np.uint8)
            image[8:24, 8 + i % 40: 24 + i % 40] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _frame_numbers(frames):
    return [round((int(np.median(f[40:, :, 1])) - 20) / 6) for f in frames]


@pytest.mark.parametrize("start", [0.0, 0.51, 1.3, 1.49])
def test_decode_returns_the_frames_shown_at_16_fps(tmp_path, start):
    path = _numbered_clip(str(tmp_path / "n.mp4"))
    config = VideoConfig(frames=16)
    frames = video.decode_frames(path, start, config)
    assert frames.shape == (16, 64, 96, 3) and frames.dtype == np.uint8
    expected = [math.floor((start + k / 16) * 32 + 1e-6) % 36 for k in range(16)]
    assert _frame_numbers(frames) == expected


def test_skipping_unreferenced_frames_before_the_clip_changes_nothing(tmp_path, monkeypatch):
    path = _numbered_clip(str(tmp_path / "n.mp4"), gop=64, bframes=3)
    config = VideoConfig(frames=8)
    fast = video.decode_frames(path, 1.7, config)
    monkeypatch.setattr(video, "REFERENCE_MARGIN", 10**6)
    np.testing.assert_array_equal(fast, video.decode_frames(path, 1.7, config))


def test_a_clip_past_the_end_is_an_error(tmp_path):
    path = _numbered_clip(str(tmp_path / "n.mp4"), seconds=1.0)
    with pytest.raises(ValueError, match="ends early"):
        video.decode_frames(path, 0.5, VideoConfig(frames=16))


def test_random_resized_crop_stays_in_range():
    config = VideoConfig()
    generator = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(400):
        aug = video.draw_augment(120, 160, config, generator)
        top, left, h, w = aug.crop
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
        areas.append(h * w / (120 * 160))
        assert 0.6 <= aug.brightness <= 1.4 and 0.6 <= aug.contrast <= 1.4 and 0.6 <= aug.saturation <= 1.4
        assert -0.2 <= aug.hue <= 0.2 and sorted(aug.order) == [0, 1, 2, 3]
    assert 0.075 <= min(areas) < 0.2 and max(areas) > 0.9
    flips = sum(video.draw_augment(120, 160, config, generator).flip for _ in range(400))
    assert 150 < flips < 250


def test_same_generator_state_same_augment():
    a = video.draw_augment(100, 200, VideoConfig(), torch.Generator().manual_seed(5))
    b = video.draw_augment(100, 200, VideoConfig(), torch.Generator().manual_seed(5))
    assert a == b


def test_crop_and_resize_in_the_decoder_match_torch(tmp_path):
    from media import make_clip

    path = make_clip(str(tmp_path / "c.mp4"), seconds=1.0, fps=16, size=(160, 120), seed=4)
    config = VideoConfig(frames=4)
    full = torch.from_numpy(video.decode_frames(path, 0.25, config)).permute(0, 3, 1, 2).float()
    crop = (20, 30, 80, 100)
    ours = torch.from_numpy(video.decode_frames(path, 0.25, config, crop=crop, size=(56, 56))).permute(0, 3, 1, 2).float()
    ref = F.interpolate(full[..., 20:100, 30:130], size=(56, 56), mode="bilinear", antialias=True, align_corners=False)
    assert ours.shape == (4, 3, 56, 56)
    # Red and green are ramps (blue is noise, which any two filters blur differently). FFmpeg
    # scales the 4:2:0 planes before converting, so a few grey levels differ; the crop must
    # still sit where torch puts it: a 2-pixel shift is far worse.
    error = (ours[:, :2] - ref[:, :2]).abs().mean()
    assert error < 6.0
    shifted = F.interpolate(full[..., 22:102, 32:132], size=(56, 56), mode="bilinear", antialias=True, align_corners=False)
    assert (shifted[:, :2] - ref[:, :2]).abs().mean() > 2.5 * error


def test_colour_jitter_matches_colorsys_and_identity():
    x = torch.rand(2, 3, 5, 7)
    assert torch.equal(video.colour_jitter(x.clone(), ClipAugment(crop=(0, 0, 1, 1))), x)
    hue = ClipAugment(crop=(0, 0, 1, 1), hue=0.13, order=(3, 0, 1, 2))
    out = video.colour_jitter(x.clone(), hue)
    for (t, i, j) in [(0, 0, 0), (1, 4, 6), (0, 2, 3)]:
        h, s, v = colorsys.rgb_to_hsv(*x[t, :, i, j].tolist())
        expected = colorsys.hsv_to_rgb((h + 0.13) % 1.0, s, v)
        np.testing.assert_allclose(out[t, :, i, j].numpy(), expected, atol=1e-5)
    grey = video.colour_jitter(x.clone(), ClipAugment(crop=(0, 0, 1, 1), saturation=0.0))
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-6)
    bright = video.colour_jitter(x.clone() * 0.5, ClipAugment(crop=(0, 0, 1, 1), brightness=1.5))
    torch.testing.assert_close(bright, x * 0.75)
    flat = video.colour_jitter(x.clone(), ClipAugment(crop=(0, 0, 1, 1), contrast=0.0))
    grey_mean = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2))
    torch.testing.assert_close(flat, grey_mean.view(2, 1, 1, 1).expand_as(flat))


def test_train_transform_layout_flip_and_normalisation():
    config = VideoConfig(frames=4)
    frames = np.random.default_rng(1).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    out = video.train_transform(frames, ClipAugment(crop=(0, 0, 112, 112), flip=True), config)
    assert out.shape == (3, 4, 112, 112) and out.dtype == torch.float32
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    expected = (torch.from_numpy(frames[2]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(out[:, 2], expected.flip(-1))


def test_eval_size_and_centre_crop():
    assert video.eval_size(720, 1280, 112) == (128, 228)
    assert video.eval_size(480, 360, 224) == (341, 256)
    frames = np.zeros((2, 128, 228, 3), np.uint8)
    frames[:, 8:120, 58:170] = 255  # exactly the centre 112 x 112
    out = video.eval_transform(frames, VideoConfig(frames=2))
    config = VideoConfig()
    white = (1 - torch.tensor(config.mean)) / torch.tensor(config.std)
    torch.testing.assert_close(out.amin(dim=(1, 2, 3)), white)


def test_clip_starts_are_evenly_spaced():
    config = VideoConfig(frames=16)  # 1 s clips
    assert video.clip_starts(11.0, config, 3) == [0.0, 5.0, 10.0]
    assert video.clip_starts(11.0, config, 1) == [5.0]
    assert video.clip_starts(0.5, config, 2) == [0.0, 0.0]
