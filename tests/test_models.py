"""Encoders, heads and AVModel against Tables 5 and 6 of the AVID-CMA supplement."""
import pytest
import torch
import torch.nn.functional as F

from avidfast.models import (AVModel, AudioEncoder, ProjectionHead, VideoEncoder, matched_mid_channels,
                             preset_input_shapes)
from avidfast.models.audio import AudioBlock
from avidfast.models.video import R2Plus1DBlock
from avidfast.config import load_config
from avidfast.checkpoints.build import build_model

# The tables as printed in the supplement (avid-cma-supplement.txt, Tables 5 and 6); the fc rows
# are checked separately (test_heads). Video columns: layer X_s X_t C K_s K_t S_s S_t;
# audio columns: layer X_f X_t C K_f K_t S_f S_t.
TABLE5_VIDEO = """
video	112	16	3	-	-	-	-
conv1	56	16	64	7	3	2	1
block2.1	56	16	64	3	3	1	1
block2.2	56	16	64	3	3	1	1
block3.1	28	8	128	3	3	2	2
block3.2	28	8	128	3	3	1	1
block4.1	14	4	256	3	3	2	2
block4.2	14	4	256	3	3	1	1
block5.1	7	2	512	3	3	2	2
block5.2	7	2	512	3	3	1	1
max pool	1	1	512	7	2	1	1
"""
TABLE5_AUDIO = """
audio	129	100	1	-	-	-	-
conv1	65	50	64	7	7	2	2
block2.1	65	50	64	3	3	1	1
block2.2	65	50	64	3	3	1	1
block3.1	33	25	128	3	3	2	2
block3.2	33	25	128	3	3	1	1
block4.1	17	13	256	3	3	2	2
block4.2	17	13	256	3	3	1	1
block5.1	17	13	512	3	3	1	1
block5.2	17	13	512	3	3	1	1
max pool	1	1	512	17	13	1	1
"""
TABLE6_VIDEO = """
video	224	8	3	-	-	-	-
conv1	112	8	64	7	3	2	1
max-pool	56	8	64	3	1	2	1
block2.1.1	56	8	64	3	3	1	1
block2.1.2	56	8	64	3	3	1	1
block2.2.1	56	8	64	3	3	1	1
block2.2.2	56	8	64	3	3	1	1
block3.1.1	28	4	128	3	3	2	2
block3.1.2	28	4	128	3	3	1	1
block3.2.1	28	4	128	3	3	1	1
block3.2.2	28	4	128	3	3	1	1
block4.1.1	14	2	256	3	3	2	2
block4.1.2	14	2	256	3	3	1	1
block4.2.1	14	2	256	3	3	1	1
block4.2.2	14	2	256	3	3	1	1
block5.1.1	7	1	512	3	3	2	2
block5.1.2	7	1	512	3	3	1	1
block5.2.1	7	1	512	3	3	1	1
block5.2.2	7	1	512	3	3	1	1
max-pool	1	1	512	7	2	1	1
"""
TABLE6_AUDIO = """
audio	257	200	1	-	-	-	-
conv1	129	100	64	7	7	2	2
block2.1	65	50	64	3	3	2	2
block2.2	65	50	64	3	3	1	1
block3.1	33	25	128	3	3	2	2
block3.2	33	25	128	3	3	1	1
block4.1	17	13	256	3	3	2	2
block4.2	17	13	256	3	3	1	1
block5.1	17	13	512	3	3	1	1
block5.2	17	13	512	3	3	1	1
max pool	1	1	512	17	13	1	1
"""
TABLES = {("table5", "video"): TABLE5_VIDEO, ("table5", "audio"): TABLE5_AUDIO,
          ("table6", "video"): TABLE6_VIDEO, ("table6", "audio"): TABLE6_AUDIO}
STAGES = ("block2", "block3", "block4", "block5")


def parse(table: str):
    rows = []
    for line in table.strip().splitlines():
        name, *cols = line.split("\t")
        rows.append((name, *[None if c == "-" else int(c) for c in cols]))
    return rows


def row_modules(encoder, modality, preset, name, index):
    """The modules a table row describes: (module whose output the row sizes, [(conv, kernel, stride)])."""
    if name in ("max pool", "max-pool") and index > 2:
        return encoder.pool, []
    if name == "max-pool":  # table6's stem max-pool
        return encoder.conv1.pool, [(encoder.conv1.pool, "pool")]
    if name == "conv1":
        return encoder.conv1.bn, [(encoder.conv1.conv, "full")]
    parts = [int(p) for p in name[len("block"):].split(".")]
    stage = getattr(encoder, f"block{parts[0]}")
    block_index, conv = (parts[1] - 1, parts[2]) if len(parts) == 3 else (0, parts[1])
    block = stage[block_index]
    if modality == "audio":
        c = getattr(block, f"conv{conv}")
        return c, [(c, "full")]
    spt, tmp = getattr(block, f"spt_conv{conv}"), getattr(block, f"tmp_conv{conv}")
    return tmp, [(spt, "spatial"), (tmp, "temporal")]


def _kernel_stride(module):
    k, s = module.kernel_size, module.stride
    k = (k,) * 3 if isinstance(k, int) else tuple(k)
    s = (s,) * 3 if isinstance(s, int) else tuple(s)
    return k, s


@pytest.mark.parametrize("width", [64, 16])
@pytest.mark.parametrize("preset", ["table5", "table6"])
@pytest.mark.parametrize("modality", ["video", "audio"])
def test_every_row_of_tables_5_and_6(modality, preset, width):
    """Every layer's output size (and kernel, stride) is the table's, at the table's input size.

    All paddings are kernel // 2. The one row that cannot hold as printed is Table 6's final video
    max-pool: it lists K_t = 2 (copied from Table 5) while block5 leaves X_t = 1; the pool is global,
    so its kernel is the whole (X_t, X_s, X_s) = (1, 7, 7) block5 output, which is what we check.
    """
    rows = parse(TABLES[(preset, modality)])
    scale = width / 64
    cls = VideoEncoder if modality == "video" else AudioEncoder
    # Width 64 computes for real; the narrower copy checks the scaled shapes on the meta device.
    device = "cpu" if width == 64 else "meta"
    with torch.device(device):
        encoder = cls(preset, width).eval()
    shapes, hooks, checks = {}, [], []
    for i, (name, xs, xt, c, ks, kt, ss, st) in enumerate(rows[1:], start=1):
        module, convs = row_modules(encoder, modality, preset, name, i)

        def record(m, inp, out, i=i):
            shapes[i] = (inp[0].shape, out.shape)

        hooks.append(module.register_forward_hook(record))
        checks.append((name, xs, xt, int(c * scale), ks, kt, ss, st, convs, i))

    _, x_a, x_b, c_in, *_ = rows[0]
    shape = (1, c_in, x_b, x_a, x_a) if modality == "video" else (1, c_in, x_a, x_b)
    with torch.no_grad():
        feats = encoder.features(torch.randn(shape, device=device))
    for h in hooks:
        h.remove()

    last_of = {}
    for key, xs, xt, c, ks, kt, ss, st, convs, i in checks:
        inp, out = shapes[i]
        expected = (1, c, xt, xs, xs) if modality == "video" else (1, c, xs, xt)
        assert tuple(out) == expected, f"{preset} {modality} {key}: {tuple(out)} != {expected}"
        if key.startswith("max"):
            if i == len(rows) - 1:  # the global pool: its kernel is its whole input
                pool_in = tuple(inp[2:])
                if modality == "video":
                    assert pool_in[1:] == (ks, ks)
                    assert pool_in[0] == (kt if preset == "table5" else 1)  # table6 prints K_t 2
                else:
                    assert pool_in == (ks, kt)
                continue
        for conv, kind in convs:
            k, s = _kernel_stride(conv)
            if modality == "audio":
                assert (k[:2], s[:2]) == ((ks, kt), (ss, st)), key
            elif kind in ("full", "pool"):
                assert (k, s) == ((kt, ks, ks), (st, ss, ss)), key
            elif kind == "spatial":
                assert (k, s) == ((1, ks, ks), (1, ss, ss)), key
            else:
                assert (k, s) == ((kt, 1, 1), (st, 1, 1)), key
        # the stage a row belongs to (table6's stem max-pool belongs to conv1); the last row wins
        last_of["conv1" if key.startswith(("conv1", "max")) else key.split(".")[0]] = expected
    # features(): conv1 is the stem's output (table6 video: after the stem max-pool), blockN the
    # output of its last row, pool the (B, C) global max.
    assert list(feats) == ["conv1", *STAGES, "pool"]
    for stage, expected in last_of.items():
        assert tuple(feats[stage].shape) == expected, stage
    assert tuple(feats["pool"].shape) == (1, 8 * width)


def test_preset_input_shapes():
    assert preset_input_shapes("table5") == {"video": (3, 16, 112, 112), "audio": (1, 129, 100)}
    assert preset_input_shapes("table6") == {"video": (3, 8, 224, 224), "audio": (1, 257, 200)}
    with pytest.raises(ValueError):
        preset_input_shapes("table7")


def _bn(c):
    return 2 * c


def _video_params(preset, w, mid="out"):
    """Parameter count derived from the architecture description, independently of the modules."""
    m = (lambda ci, co: co) if mid == "out" else matched_mid_channels
    n = 3 * w * 3 * 7 * 7 + _bn(w)
    blocks = 1 if preset == "table5" else 2
    cin = w
    for cout in (w, 2 * w, 4 * w, 8 * w):
        for b in range(blocks):
            ci = cin if b == 0 else cout
            m1, m2 = m(ci, cout), m(cout, cout)
            n += ci * m1 * 9 + _bn(m1) + m1 * cout * 3 + _bn(cout)
            n += cout * m2 * 9 + _bn(m2) + m2 * cout * 3 + _bn(cout)
            n += ci * cout if ci != cout else 0
        cin = cout
    return n


def _audio_params(w):
    n = 49 * w + _bn(w)
    cin = w
    for cout in (w, 2 * w, 4 * w, 8 * w):
        n += cin * cout * 9 + _bn(cout) + cout * cout * 9 + _bn(cout)
        cin = cout
    return n


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _meta(cls, *args, **kwargs):
    """Builds a module on the meta device: parameter shapes without the cost of initialising them."""
    with torch.device("meta"):
        return cls(*args, **kwargs)


def test_parameter_counts():
    # At width 64, the counts the reference architecture gives (its checkpoints map one to one).
    assert _count(_meta(VideoEncoder, "table5")) == _video_params("table5", 64) == 7_015_616
    assert _count(_meta(VideoEncoder, "table6")) == _video_params("table6", 64) == 15_379_136
    assert _count(_meta(AudioEncoder, "table5")) == _audio_params(64) == 4_725_696
    assert _count(_meta(AudioEncoder, "table6")) == _audio_params(64)
    assert _count(_meta(ProjectionHead)) == 512 * 512 * 2 + 512 * 128 + 512 * 2 + 128 == 590_976
    # "matched" mid channels: the R(2+1)D paper's count, per (2+1)D conv.
    assert matched_mid_channels(64, 64) == 144 and matched_mid_channels(64, 128) == 230
    matched = _count(_meta(VideoEncoder, "table6", mid_channels="matched"))
    assert matched == _video_params("table6", 64, "matched")
    # R(2+1)D-18 with parameter-matched factorisation is ~31M (33.2M here with per-conv M).
    assert 30e6 < matched < 35e6
    blk = _meta(VideoEncoder, "table6", 64, mid_channels="matched").block3[0]
    assert (blk.spt_conv1.out_channels, blk.spt_conv2.out_channels) == (230, 288)


@pytest.mark.parametrize("preset", ["table5", "table6"])
def test_width_scaling(preset):
    for cls in (VideoEncoder, AudioEncoder):
        n64, n32 = _count(_meta(cls, preset, 64)), _count(_meta(cls, preset, 32))
        assert 0.245 < n32 / n64 < 0.255  # conv weights scale with width^2
        assert _meta(cls, preset, 32).out_dim == 256 and _meta(cls, preset, 16).out_dim == 128
    assert _video_params(preset, 16) == _count(_meta(VideoEncoder, preset, 16))
    assert _audio_params(16) == _count(_meta(AudioEncoder, preset, 16))
    model = _meta(AVModel.from_preset, preset, width=16)
    assert model.video_head.fc1.in_features == 128 and model.video_head.fc3.out_features == 128


def test_reference_names_one_to_one():
    """Per block exactly the reference's parameter/buffer names (issue 7 maps checkpoints by name)."""
    enc = VideoEncoder("table6", 8)
    def bn(p):
        return {f"{p}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}

    core = {"spt_conv1.weight", "tmp_conv1.weight", "spt_conv2.weight", "tmp_conv2.weight",
            *bn("spt_bn1"), *bn("tmp_bn1"), *bn("spt_bn2"), *bn("out_bn")}
    assert set(enc.block2[0].state_dict()) == core == set(enc.block2[1].state_dict())
    assert set(enc.block3[0].state_dict()) == core | {"res_conv.weight"}
    assert set(enc.conv1.state_dict()) == {"conv.weight", *bn("bn")}
    aud = AudioEncoder("table6", 8)
    assert set(aud.block3[0].state_dict()) == {"conv1.weight", "conv2.weight", *bn("bn1"), *bn("bn2")}
    assert [n for n, _ in ProjectionHead().named_children()] == ["fc1", "fc2", "fc3"]


def test_block_order_of_operations():
    """R2Plus1DBlock's order: spt1 bn ReLU tmp1 bn ReLU spt2 bn ReLU tmp2, + res_conv(x), out_bn, ReLU."""
    blk = R2Plus1DBlock(4, 8, stride=2).eval()
    for m in blk.modules():  # non-trivial BN statistics and affine terms
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 4, 6, 6)
    with torch.no_grad():
        y = F.relu(blk.spt_bn1(blk.spt_conv1(x)))
        y = F.relu(blk.tmp_bn1(blk.tmp_conv1(y)))
        y = blk.tmp_conv2(F.relu(blk.spt_bn2(blk.spt_conv2(y))))
        expected = F.relu(blk.out_bn(y + blk.res_conv(x)))
        torch.testing.assert_close(blk(x), expected)
        pre = R2Plus1DBlock(4, 8, stride=2, out_bn="before_sum").eval()
        assert pre.res_bn is not None
        y = F.relu(pre.spt_bn1(pre.spt_conv1(x)))
        y = F.relu(pre.tmp_bn1(pre.tmp_conv1(y)))
        y = pre.tmp_conv2(F.relu(pre.spt_bn2(pre.spt_conv2(y))))
        torch.testing.assert_close(pre(x), F.relu(pre.out_bn(y) + pre.res_bn(pre.res_conv(x))))


def test_zero_init_last_bn_makes_blocks_start_at_their_shortcut():
    x = torch.randn(2, 8, 4, 6, 6)
    with torch.no_grad():
        for out_bn in ("after_sum", "before_sum"):
            enc = VideoEncoder("table5", 8, out_bn=out_bn, zero_init_last_bn=True).eval()
            blk = enc.block2[0]  # identity shortcut
            expected = F.relu(blk.out_bn(x)) if out_bn == "after_sum" else F.relu(x)
            torch.testing.assert_close(blk(x), expected)
        assert VideoEncoder("table5", 8).block2[0].spt_bn2.weight.eq(1).all()  # off by default
        aud = AudioEncoder("table5", 8, residual=True, zero_init_last_bn=True).eval()
        xa = torch.randn(2, 8, 9, 7)
        torch.testing.assert_close(aud.block2[0](xa), F.relu(xa))
        assert isinstance(aud.block3[0], AudioBlock) and aud.block3[0].res_conv is not None
    with pytest.raises(ValueError, match="residual"):
        AudioEncoder("table5", 8, zero_init_last_bn=True)


def test_options_and_bad_arguments():
    enc = VideoEncoder("table5", 8, stem="2plus1d", mid_channels="matched")
    assert enc.conv1.spt_conv.out_channels == matched_mid_channels(3, 8, 3, 7)
    with torch.no_grad():
        assert tuple(enc.features(torch.randn(1, 3, 16, 112, 112))["conv1"].shape) == (1, 8, 16, 56, 56)
    bad = ({"depth": "table7"}, {"mid_channels": "half"}, {"stem": "2d"}, {"out_bn": "x"}, {"width": 0})
    for kwargs in bad:
        with pytest.raises(ValueError):
            VideoEncoder(**kwargs)
    with pytest.raises(ValueError):
        AudioEncoder("table4")
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        VideoEncoder("table5", 8)(torch.randn(1, 3, 16, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, F, T\)"):
        AudioEncoder("table5", 8)(torch.randn(1, 2, 16, 32))
    with pytest.raises(ValueError):
        AVModel.from_preset("table9")


def test_transposed_spectrogram_is_refused_naming_the_layout():
    model = AVModel.from_preset("table6", width=4, embed_dim=8, audio_preset="table6").eval()
    video = torch.randn(2, 3, 4, 32, 32)
    expected = ("audio: expected (B, 1, F=257, T) log-spectrogram (frequency bins on dim 2) for preset table6, "
                "got shape (2, 1, 200, 257): it looks transposed; pass spec.transpose(2, 3)")
    spec = torch.randn(2, 1, 257, 200)
    with torch.no_grad():
        for call in (lambda a: model(video, a), model.embed_audio, model.audio, model.audio.features):
            with pytest.raises(ValueError) as info:
                call(spec.transpose(2, 3))
            assert str(info.value) == expected
        v, a = model(video, spec)  # the right layout works
        assert v.shape == a.shape == (2, 8) and torch.isfinite(a).all()
        torch.testing.assert_close(model(video, spec.transpose(2, 3).transpose(2, 3))[1], a)  # the fix it names
        with pytest.raises(ValueError, match=r"got shape \(2, 1, 129, 100\): 129 frequency bins, not 257"):
            model(video, torch.randn(2, 1, 129, 100))  # another preset's spectrogram
        with pytest.raises(ValueError, match=r"\(B, 1, F=257, T\).*pass spec.unsqueeze\(1\)"):
            model(video, spec[:, 0])
        # training builds the model for data.audio.preset (demo: table5, 129 x 100)
        demo = build_model(load_config("demo", ["model.width=4"])).eval()
        assert demo.audio.audio_preset == "table5" and demo.audio.freq_bins == 129
        assert demo(video, torch.randn(2, 1, 129, 100))[1].shape == (2, 128)
        with pytest.raises(ValueError, match=r"F=129, T\).*preset table5, got shape \(2, 1, 100, 129\): it looks "
                                             r"transposed; pass spec.transpose\(2, 3\)"):
            demo(video, torch.randn(2, 1, 100, 129))
        model.audio.audio_preset = None  # no preset: dims and channels only, any F works
        assert model(video, spec.transpose(2, 3))[1].shape == (2, 8)
    assert AVModel.from_preset("table5").audio.freq_bins is None  # no preset given: no frequency check
    with pytest.raises(ValueError, match="audio preset 'table7': unknown"):
        AudioEncoder("table5", 4, audio_preset="table7")


def test_reference_preset_spectrograms_keep_working():
    # the reference preset: 257 x 200, the layout of table6 (the config refuses it with a table5 network)
    video, spec = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 257, 200)
    for model in (AVModel.from_preset("table6", width=4, embed_dim=8, audio_preset="reference"),
                  build_model(load_config("demo", ["model.width=4", "model.preset=table6",
                                                   "data.audio.preset=reference"]))):
        model.eval()
        assert model.audio.freq_bins == 257
        with torch.no_grad():
            v, a = model(video, spec)
            assert torch.isfinite(a).all() and a.shape == v.shape
            with pytest.raises(ValueError, match=r"F=257, T\).*preset reference.*it looks transposed"):
                model(video, spec.transpose(2, 3))


def test_video_with_channels_on_dim_2_is_refused():
    model = AVModel.from_preset("table5", width=4, embed_dim=8, audio_preset="table5").eval()
    video, audio = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 129, 100)
    with torch.no_grad():
        for call in (lambda v: model(v, audio), model.embed_video, model.video, model.video.features):
            with pytest.raises(ValueError) as info:
                call(video.transpose(1, 2))
            assert str(info.value) == ("video: expected (B, 3, T, H, W) clips (channels on dim 1), got shape "
                                       "(2, 4, 3, 32, 32): channels are on dim 2, it looks like (B, T, 3, H, W); "
                                       "pass video.transpose(1, 2)")
        with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\).*\(3, 4, 32, 32\): the batch dim is missing"):
            model(video[0], audio)
        with pytest.raises(ValueError, match=r"channels are on dim 4.*permute\(0, 4, 1, 2, 3\)"):
            model(video.permute(0, 2, 3, 4, 1), audio)
        with pytest.raises(ValueError, match=r"got shape \(2, 1, 4, 32, 32\)$"):
            model(video[:, :1], audio)  # wrong channel count
        # any frame count works (nothing in the network fixes it)
        assert model(torch.randn(2, 3, 6, 32, 32), audio)[0].shape == (2, 8)


def test_layout_checks_under_torch_compile():
    model = AVModel.from_preset("table5", width=4, embed_dim=8, audio_preset="table5").eval()
    video, audio = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 1, 129, 100)
    with torch.no_grad():
        want = model(video, audio)
        got = torch.compile(model, backend="eager", fullgraph=True)(video, audio)  # the checks break no graph
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w)
        compiled = torch.compile(model, backend="eager")
        with pytest.raises(ValueError, match=r"it looks transposed; pass spec.transpose\(2, 3\)"):
            compiled(video, audio.transpose(2, 3))
        with pytest.raises(ValueError, match=r"pass video.transpose\(1, 2\)"):
            compiled(video.transpose(1, 2), audio)


def test_heads():
    head = ProjectionHead(32, 16, 8)
    x = torch.randn(5, 32)
    expected = head.fc3(F.relu(head.fc2(F.relu(head.fc1(x)))))
    torch.testing.assert_close(head(x), expected)
    assert not torch.allclose(expected.norm(dim=1), torch.ones(5))  # raw: AVModel normalises
    lin = ProjectionHead(32, 16, 8, num_layers=1)
    assert [n for n, _ in lin.named_children()] == ["fc1"] and lin.fc1.out_features == 8
    with pytest.raises(ValueError):
        head(torch.randn(5, 31))


def test_head_input_norm_standardises_the_shared_mean_of_pooled_features():
    # pooled ReLU features: a large positive mean shared by every clip, small clip-specific parts
    torch.manual_seed(0)
    x = 3.0 + 0.3 * torch.randn(16, 32)
    plain, normed = ProjectionHead(32, 16, 8), ProjectionHead(32, 16, 8, input_norm=True)
    normed.load_state_dict({**plain.state_dict(), **{k: v for k, v in normed.state_dict().items() if "in_bn" in k}})
    bn = normed.in_bn
    expected = plain((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps))
    torch.testing.assert_close(normed(x), expected)  # train mode: batch statistics, then the same MLP

    def mean_cos(e):
        e = F.normalize(e, dim=1)
        return float(((e @ e.T).sum() - len(e)) / (len(e) * (len(e) - 1)))

    # Nearly one direction without it; the ReLU layers still share some with it. One random head varies a lot
    # (0.93-0.999 plain, 0.75-0.97 normed over 300 seeds), so compare medians over 8 heads (100 seeds:
    # plain >= 0.987, normed <= 0.915).
    plain_cos, normed_cos = [], []
    for _ in range(8):
        plain, normed = ProjectionHead(32, 16, 8), ProjectionHead(32, 16, 8, input_norm=True)
        normed.load_state_dict({**plain.state_dict(), **{k: v for k, v in normed.state_dict().items() if "in_bn" in k}})
        with torch.no_grad():
            plain_cos.append(mean_cos(plain(x)))
            normed_cos.append(mean_cos(normed(x)))
    assert torch.tensor(plain_cos).median() > 0.97 and torch.tensor(normed_cos).median() < 0.94
    model = build_model(load_config("demo"))  # the demo turns it on; the paper's configs leave it off
    assert isinstance(model.video_head.in_bn, torch.nn.BatchNorm1d) and isinstance(model.audio_head.in_bn, torch.nn.BatchNorm1d)
    assert build_model(load_config("demo", ["model.head_input_norm=false"])).video_head.in_bn is None
    assert all(load_config(name).model.head_input_norm is False for name in ("avid_s4_audioset", "avid_s6_kinetics", "cma_s6_kinetics"))


def _small_inputs(b=2):
    return torch.randn(b, 3, 8, 40, 40), torch.randn(b, 1, 40, 32)


@pytest.mark.parametrize("preset", ["table5", "table6"])
def test_avmodel_unit_norm_embeddings_and_gradients(preset):
    model = AVModel.from_preset(preset, width=8).train()
    video, audio = _small_inputs()
    v, a = model(video, audio)
    assert v.shape == a.shape == (2, 128)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    (v @ a.t()).diagonal().sum().neg().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed_video(video),
                                   F.normalize(model.video_head(model.video(video)), dim=1))
        torch.testing.assert_close(model.embed_audio(audio), model(video, audio)[1])
        feats = model.video.features(video)
        assert list(feats) == ["conv1", *STAGES, "pool"]
        torch.testing.assert_close(feats["pool"], model.video(video))
        torch.testing.assert_close(model.audio.features(audio)["pool"], model.audio(audio))


@pytest.mark.parametrize("preset, train", [("table5", False), ("table6", False), ("table6", True)])
def test_channels_last_gives_the_same_output(preset, train):
    # With one intra-op thread PyTorch's CPU conv3d takes a path that returns contiguous outputs,
    # so the layout check below holds for the multi-threaded path only: pin two threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_channels_last(preset, train)
    finally:
        torch.set_num_threads(threads)


def _check_channels_last(preset, train):
    torch.manual_seed(0)
    model = AVModel.from_preset(preset, width=8).train(train)
    video, audio = _small_inputs()
    with torch.no_grad():
        ref = model(video, audio)
        ref_feats = model.video.features(video)
        model.video.to(memory_format=torch.channels_last_3d)  # as the training loop does
        model.audio.to(memory_format=torch.channels_last)
        assert model.video.block3[0].spt_conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
        assert model.audio.block3[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
        video_cl = video.contiguous(memory_format=torch.channels_last_3d)
        audio_cl = audio.contiguous(memory_format=torch.channels_last)
        out = model(video_cl, audio_cl)
        feats = model.video.features(video_cl)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
    for k in ("conv1", *STAGES):  # the activations stay in channels_last_3d, no hidden copies back
        assert feats[k].is_contiguous(memory_format=torch.channels_last_3d), k
    # Activations agree to float rounding; in train mode BN over block5's few values per channel
    # (batch 2 x 1 x 2 x 2 at this input) amplifies rounding, so its tolerance is looser.
    tol = 1e-3 if train else 1e-4
    for k in ref_feats:
        torch.testing.assert_close(feats[k], ref_feats[k], rtol=tol, atol=tol)
    # and backward runs in that layout
    v, a = model(video_cl, audio_cl)
    (v * a).sum().backward()
    assert model.video.conv1.conv.weight.grad is not None


def test_deterministic_init_with_a_seed():
    def build(seed):
        torch.manual_seed(seed)
        return AVModel.from_preset("table6", width=8).state_dict()

    a, b, c = build(3), build(3), build(4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["video.block2.0.spt_conv1.weight"], c["video.block2.0.spt_conv1.weight"])
    # BN starts at identity; convs are kaiming-normal (fan_out, relu): std = sqrt(2 / fan_out)
    assert a["video.block5.0.out_bn.weight"].eq(1).all() and a["video.block5.0.out_bn.bias"].eq(0).all()
    w = VideoEncoder("table5", width=32).block5[0].spt_conv2.weight  # fan_out = 256 * 9
    assert abs(w.std().item() / (2 / (256 * 9)) ** 0.5 - 1) < 0.02
