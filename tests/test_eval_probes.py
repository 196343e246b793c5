"""Evaluation: feature extraction per block, linear probes per block, memory probes."""
import statistics
from collections import OrderedDict

import pytest
import torch

from avidfast.data.cpu_pipeline import ClipDataset, CPULoader
from avidfast.data.manifest import read_manifest
from avidfast.data.synthetic import make_dataset
from avidfast.data.video import VideoConfig
from avidfast.eval import (
    FeatureSet,
    extract_features,
    memory_probe,
    train_linear_probe,
    video_level,
    video_level_accuracy,
)
from avidfast.eval.features import video_labels
from avidfast.eval.linear_probe import predict_proba
from avidfast.eval.memory_probe import split_rows


# ---------------------------------------------------------------- synthetic features

def clusters(n: int, means: torch.Tensor, noise: float = 1.0):
    """n rows of a Gaussian mixture: class c around means[c], isotropic ``noise``."""
    y = torch.randint(0, means.shape[0], (n,))
    return means[y] + noise * torch.randn(n, means.shape[1]), y


def feature_set(blocks, label, index=None) -> FeatureSet:
    n = label.shape[0]
    index = torch.arange(n) if index is None else index
    return FeatureSet(dict(blocks), index, torch.zeros(n, dtype=torch.int64), label)


def well_separated(k: int = 5, d: int = 32) -> torch.Tensor:
    return 1.5 * torch.randn(k, d)  # pairwise distances ~ 12 noise sigmas: Bayes top-1 ~ 100 %


FAST = dict(epochs=15, batch_size=128, seed=0)


def test_probe_learns_separable_clusters_and_not_random_labels():
    means = well_separated()
    x_train, y_train = clusters(500, means)
    x_test, y_test = clusters(500, means)
    good = train_linear_probe((x_train, y_train), (x_test, y_test), **FAST)
    assert good.blocks == ["features"] and good.chance == pytest.approx(1 / 5)
    assert good.clip_top1["features"] > 0.9
    assert good.video_top1["features"] == good.clip_top1["features"]  # one clip per video

    random_train = torch.randint(0, 5, (500,))
    random_test = torch.randint(0, 5, (500,))
    bad = train_linear_probe((x_train, random_train), (x_test, random_test), **FAST)
    # The test labels are independent of everything the probe saw: top-1 ~ Binomial(500, 0.2) / 500.
    assert abs(bad.clip_top1["features"] - 0.2) < 0.1
    assert bad.train_top1["features"] > bad.clip_top1["features"]  # it fits the noise it was given


@pytest.mark.parametrize("settings", [dict(optimizer="sgd", lr=0.05), dict(standardize=False)])
def test_probe_variants_learn(settings):
    means = well_separated()
    x_train, y_train = clusters(400, means)
    x_test, y_test = clusters(300, means)
    result = train_linear_probe((x_train, y_train), (x_test, y_test), **{**FAST, **settings})
    assert result.clip_top1["features"] > 0.9


def test_blocks_are_independent_probes():
    means = well_separated(k=4, d=24)
    x_train, y_train = clusters(400, means)
    x_test, y_test = clusters(400, means)
    train = feature_set({"noise": torch.randn(400, 40), "good": x_train, "scaled": 100 * x_train + 7}, y_train)
    test = feature_set({"noise": torch.randn(400, 40), "good": x_test, "scaled": 100 * x_test + 7}, y_test)
    together = train_linear_probe(train, test, **FAST)
    assert together.blocks == ["noise", "good", "scaled"]
    assert together.clip_top1["good"] > 0.9 and together.clip_top1["scaled"] > 0.9
    assert abs(together.clip_top1["noise"] - 0.25) < 0.1
    assert together.best_block == "good"  # ties with "scaled" go to the earlier block
    assert together.chance == 0.25 and together.num_classes == 4

    # Trained alone, with the same seed, a block's probe is bit-identical to its probe trained with the others.
    alone = train_linear_probe(train, test, blocks=["good"], **FAST)
    assert alone.clip_top1["good"] == together.clip_top1["good"]
    torch.testing.assert_close(alone.model.heads[0].weight, together.model.heads[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(alone.model.heads[0].bias, together.model.heads[1].bias, rtol=0, atol=0)

    table = together.format()
    for name in ("noise", "good", "scaled", "best: good", "chance 25.00%"):
        assert name in table


def test_probe_is_deterministic_given_a_seed():
    x, y = torch.randn(300, 20), torch.randint(0, 3, (300,))
    xt, yt = torch.randn(100, 20), torch.randint(0, 3, (100,))
    a = train_linear_probe((x, y), (xt, yt), **FAST)
    b = train_linear_probe((x, y), (xt, yt), **FAST)
    c = train_linear_probe((x, y), (xt, yt), **{**FAST, "seed": 1})
    assert a.to_dict() | {"seconds": 0} == b.to_dict() | {"seconds": 0}
    assert torch.equal(a.model.heads[0].weight, b.model.heads[0].weight)
    assert not torch.equal(a.model.heads[0].weight, c.model.heads[0].weight)  # another minibatch order


def test_video_level_aggregation_by_hand():
    # Three videos, clips interleaved. Video 7: two clips lean (barely) to class 0, one is sure of
    # class 1: majority vote says 0, the mean of the softmax says 1.
    scores = torch.tensor([
        [0.51, 0.49],  # video 7
        [0.60, 0.40],  # video 2
        [0.51, 0.49],  # video 7
        [0.45, 0.55],  # video 5
        [0.00, 1.00],  # video 7
        [0.95, 0.05],  # video 5
    ])
    index = torch.tensor([7, 2, 7, 5, 7, 5])
    label = torch.tensor([1, 1, 1, 0, 1, 0])
    videos, mean = video_level(scores, index)
    assert videos.tolist() == [2, 5, 7]
    torch.testing.assert_close(mean, torch.tensor([[0.60, 0.40], [0.70, 0.30], [0.34, 0.66]]))
    assert video_labels(label, index)[1].tolist() == [1, 0, 1]
    assert video_level_accuracy(scores, index, label) == pytest.approx(2 / 3)  # video 2 is wrong
    with pytest.raises(ValueError, match="video 5"):
        video_labels(torch.tensor([1, 1, 1, 0, 1, 1]), index)


def test_probe_reports_video_level_from_mean_softmax():
    means = 0.35 * torch.randn(4, 16)
    x_train, y_train = clusters(600, means)
    videos, clips = 80, 5
    video_class = torch.randint(0, 4, (videos,))
    index = torch.arange(videos).repeat_interleave(clips)
    x_test = means[video_class[index]] + torch.randn(videos * clips, 16)
    test = FeatureSet({"f": x_test}, index, torch.arange(clips).repeat(videos), video_class[index])
    result = train_linear_probe(feature_set({"f": x_train}, y_train), test, **FAST)
    assert result.num_test == 400 and result.num_test_videos == 80
    probs = predict_proba(result.model, test)["f"]
    assert result.clip_top1["f"] == pytest.approx(float((probs.argmax(1) == test.label).double().mean()))
    assert result.video_top1["f"] == pytest.approx(video_level_accuracy(probs, index, test.label))
    assert result.video_top1["f"] > result.clip_top1["f"] + 0.05  # 5 noisy clips vote better than one


def test_probe_rejects_bad_input():
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    with pytest.raises(KeyError, match="lacks blocks"):
        train_linear_probe(feature_set({"a": x}, y), feature_set({"b": x}, y), epochs=1)
    with pytest.raises(ValueError, match="dims"):
        train_linear_probe((x, y), (torch.randn(20, 5), y), epochs=1)
    with pytest.raises(ValueError, match="no labels"):
        train_linear_probe((x, y), FeatureSet({"features": x}, torch.arange(20), torch.zeros(20, dtype=torch.long)))


# ---------------------------------------------------------------- memory probe

def test_memory_probe_repeats_splits_and_statistics():
    n, k = 1000, 4
    labels = torch.randint(0, k, (n,))
    video = torch.nn.functional.normalize(well_separated(k, 16)[labels] + torch.randn(n, 16), dim=1)
    audio = torch.nn.functional.normalize(torch.randn(n, 16), dim=1).to(torch.bfloat16)  # carries nothing
    result = memory_probe(video, audio, labels, repeats=5, seed=3, epochs=8, batch_size=512)
    assert result.kinds == ["video", "audio", "combined"] and result.repeats == 5
    for kind in result.kinds:
        assert len(result.top1[kind]) == 5
        assert result.mean[kind] == pytest.approx(statistics.fmean(result.top1[kind]))
        assert result.std[kind] == pytest.approx(torch.tensor(result.top1[kind], dtype=torch.float64).std().item())
    assert result.mean["video"] > 0.9 and result.mean["combined"] > 0.9
    assert abs(result.mean["audio"] - 0.25) < 0.1 and result.chance == 0.25
    assert result.std["audio"] > 0  # the splits differ, so do the accuracies

    everything = set(range(n))
    for train, val in result.splits:
        assert len(train) == 700 and len(val) == 300
        assert not set(train.tolist()) & set(val.tolist())
        assert set(train.tolist()) | set(val.tolist()) == everything
    assert len({tuple(train.tolist()) for train, _ in result.splits}) == 5

    table = result.format()
    assert "Video Mem" in table and "Combined Mem" in table and "70/30" in table
    assert f"{100 * result.mean['video']:.2f} \u00b1 {100 * result.std['video']:.2f}" in table


def test_memory_probe_is_seeded_and_skips_unlabelled_rows():
    n = 200
    labels = torch.randint(0, 3, (n,))
    labels[::10] = -1  # unlabelled rows
    video, audio = torch.randn(n, 8), torch.randn(n, 8)
    a = memory_probe(video, audio, labels, repeats=2, seed=5, epochs=2, kinds=("video", "combined"))
    b = memory_probe(video, audio, labels, repeats=2, seed=5, epochs=2, kinds=("video", "combined"))
    c = memory_probe(video, audio, labels, repeats=2, seed=6, epochs=2, kinds=("video", "combined"))
    assert a.kinds == ["video", "combined"] and a.num_rows == 180
    assert a.top1 == b.top1
    for (ta, va), (tb, vb), (tc, _) in zip(a.splits, b.splits, c.splits):
        assert torch.equal(ta, tb) and torch.equal(va, vb) and not torch.equal(ta, tc)
        assert len(ta) == 126 and len(va) == 54
        assert (labels[ta] >= 0).all() and (labels[va] >= 0).all()
    train, val = split_rows(10, 0.7, seed=0, repeat=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(10)) and len(train) == 7
    with pytest.raises(ValueError, match="train_fraction"):
        split_rows(10, 1.0, seed=0, repeat=0)


# ---------------------------------------------------------------- feature extraction

class FakeEncoder(torch.nn.Module):
    """Two 1x1 conv 'blocks' and a global max-pool; dropout shows whether eval mode is used."""

    def __init__(self, in_channels: int, dims: int):
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.conv1 = conv(in_channels, 4, 1)
        self.block2 = conv(4, 6, 1)
        self.drop = torch.nn.Dropout(0.5)

    def features(self, x):
        c1 = torch.relu(self.conv1(x))
        b2 = self.drop(self.block2(c1))
        return OrderedDict(conv1=c1, block2=b2, pool=b2.flatten(2).amax(2))


class FakeAVModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.video, self.audio = FakeEncoder(3, 3), FakeEncoder(1, 2)


@pytest.fixture(scope="module")
def eval_batches(tmp_path_factory):
    path = make_dataset(str(tmp_path_factory.mktemp("evalset")), num_videos=6, num_classes=3, seconds=2.0, seed=1,
                        size=(64, 48), workers=1)
    manifest = read_manifest(path)
    dataset = ClipDataset(manifest, video=VideoConfig(frames=4, crop=32), mode="eval", clips_per_video=2)
    return manifest, list(CPULoader(dataset, batch_size=5, workers=0))


def test_extract_features_shapes_alignment_and_pooling(eval_batches):
    manifest, batches = eval_batches
    encoder = FakeEncoder(3, 3)
    encoder.train()
    out = extract_features(encoder, batches, modality="video", progress=True)
    assert out.blocks == ["conv1", "block2", "pool"] and len(out) == 12
    assert out.features["conv1"].shape == (12, 4) and out.features["block2"].shape == (12, 6)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in out.features.values())
    assert out.index.tolist() == [v for v in range(6) for _ in range(2)]
    assert out.clip.tolist() == [0, 1] * 6
    labels = manifest.label_indices()
    assert out.label.tolist() == [labels[i] for i in out.index.tolist()]
    assert out.num_videos == 6
    assert encoder.training and all(p.grad is None for p in encoder.parameters())

    # Max over (T, H, W) of each map, computed in eval mode (no dropout), row for row.
    encoder.eval()
    with torch.no_grad():
        video = torch.cat([b["video"] for b in batches])
        maps = encoder.features(video)
    torch.testing.assert_close(out.features["conv1"], maps["conv1"].amax(dim=(2, 3, 4)))
    torch.testing.assert_close(out.features["block2"], maps["block2"].amax(dim=(2, 3, 4)))
    torch.testing.assert_close(out.features["pool"], out.features["block2"])
    mean = extract_features(encoder, batches, blocks=["block2"], pool="mean", progress=False)
    assert mean.blocks == ["block2"]
    torch.testing.assert_close(mean.features["block2"], maps["block2"].mean(dim=(2, 3, 4)))
    with pytest.raises(KeyError, match="block9"):
        extract_features(encoder, batches, blocks=["block9"], progress=False)


def test_extract_audio_features_from_an_av_model(eval_batches, tmp_path):
    _, batches = eval_batches
    model = FakeAVModel()
    out = extract_features(model, batches, modality="audio", blocks=["conv1", "pool"], progress=False)
    assert out.blocks == ["conv1", "pool"] and out.features["pool"].shape == (12, 6)
    with torch.no_grad():
        model.audio.eval()
        audio = torch.cat([b["audio"] for b in batches])
        expected = model.audio.features(audio)["conv1"].amax(dim=(2, 3))
    torch.testing.assert_close(out.features["conv1"], expected)
    out.save(str(tmp_path / "feats.pt"))
    back = FeatureSet.load(str(tmp_path / "feats.pt"))
    assert back.blocks == out.blocks and torch.equal(back.features["pool"], out.features["pool"])
    assert torch.equal(back.index, out.index) and torch.equal(back.label, out.label)
    with pytest.raises(TypeError, match="features"):
        extract_features(torch.nn.Linear(2, 2), batches, progress=False)


# ---------------------------------------------------------------- class indices

def test_memory_probe_indexes_classes_as_the_linear_probe_does(tmp_path):
    from avidfast.data.manifest import write_manifest
    from avidfast.eval.config import EvalConfig, EvalDataSection
    from avidfast.eval.data import labelled_split
    from avidfast.eval.memory_protocol import memory_labels

    labels = ["10", "9", "b", "A", "9", "10", "A", "b"]
    path = str(tmp_path / "labels.csv")
    write_manifest(path, [{"path": f"v{i}.mp4", "label": label} for i, label in enumerate(labels)])
    manifest = read_manifest(path)
    assert manifest.classes == ["9", "10", "A", "b"] != sorted(set(labels))  # not the plain string order
    classes, memory = memory_labels(manifest)
    split = labelled_split(EvalConfig(data=EvalDataSection(train_manifest=path, test_manifest=path)))
    linear = ClipDataset(split.train, mode="eval", classes=split.classes).labels
    assert classes == split.classes == manifest.classes
    assert memory == linear == [manifest.classes.index(label) for label in labels]
    # a row without a label is left out of the memory probe (-1); the others keep their indices
    write_manifest(path, [{"path": f"v{i}.mp4", "label": "" if i == 0 else label} for i, label in enumerate(labels)],
                   ["path", "label"])
    assert memory_labels(read_manifest(path)) == (classes, [-1] + memory[1:])


def test_device_errors_name_the_setting():
    from avidfast.errors import AvidfastError
    from avidfast.eval.data import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(AvidfastError, match="--device gpu: not a device"):
        resolve_device("gpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(AvidfastError, match="run.device=cuda: no CUDA device is visible; use --set run.device=cpu"):
            resolve_device("cuda")
        with pytest.raises(AvidfastError, match="--device cuda:1: no CUDA device is visible; use --device cpu"):
            resolve_device("cuda:1", "--device")
    else:
        assert resolve_device("cuda").index is not None  # torch.cuda.set_device needs an index
