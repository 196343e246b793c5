"""Video-only evaluation (issue 15, items 1-4): sets where half the videos have no audio stream, each
test video scored exactly once, unreadable test videos (error or excluded and listed), the reference's
linear probe (grids, BatchNorm1d, feature sizes), padding of short clips, classifier warm-up, folds."""
import csv
import json
import os

import pytest
import torch

from avidfast.cli import main
from avidfast.data.cpu_pipeline import BadTestVideo, ClipDataset, CPULoader, pad_frames_cyclically
from avidfast.data.manifest import ManifestError, read_manifest
from avidfast.data.prepare import prepare
from avidfast.data.probe import probe
from avidfast.data.synthetic import make_dataset, silent_rows
from avidfast.data.video import VideoConfig
from avidfast.eval.config import load_eval_config
from avidfast.eval.finetune import run_finetune
from avidfast.eval.linear_protocol import REFERENCE_GRIDS, probe_feature_sizes, run_linear_eval
from avidfast.eval.run import start_run
from avidfast.models.video import VideoEncoder

NUM_VIDEOS, NUM_CLASSES, CLIPS = 12, 3, 2
TEST_VIDEOS = 3  # test_fraction 0.3 of 4 videos per class: one per class
SMALL = ["optim.epochs=1", "optim.batch_size=3", "data.workers=0", "run.progress=false", "run.log_every=1",
         f"data.clips_per_video={CLIPS}", "run.device=cpu", "optim.milestones=[]"]


@pytest.fixture(scope="module")
def half_silent(tmp_path_factory):
    """A UCF-like labelled set of 12 clips (3 classes) where 6 clips have no audio stream."""
    root = tmp_path_factory.mktemp("silent")
    manifest = make_dataset(str(root / "data"), num_videos=NUM_VIDEOS, num_classes=NUM_CLASSES, seconds=1.0, seed=0,
                            size=(64, 48), silent_fraction=0.5, workers=1)
    return manifest


def _tiny_encoder():
    torch.manual_seed(0)
    return VideoEncoder(depth="table5", width=4)


def _cfg(name, manifest, *extra):
    return load_eval_config(name, SMALL + [f"data.train_manifest={manifest}"] + list(extra))


def _run(runner, cfg, encoder, out_dir):
    run = start_run(str(out_dir), cfg.to_dict(), cfg.run.device, cfg.run.precision, {}, cfg.seed)
    result = runner(cfg, encoder, run)
    run.finish(result.to_dict(), result.format())
    return result


def test_synthetic_half_silent_set_has_no_audio_where_it_says(half_silent):
    rows = read_manifest(half_silent)
    silent = set(silent_rows(NUM_VIDEOS, 0.5, 0))
    assert len(silent) == NUM_VIDEOS // 2
    for i in range(len(rows)):
        assert probe(rows.path(i), check="header").has_audio == (i not in silent), i


def test_prepare_video_only_keeps_silent_files_and_records_it(half_silent, tmp_path):
    normal = prepare(half_silent, str(tmp_path / "av"), workers=0, min_seconds=0.5, progress=False)
    assert normal.kept == NUM_VIDEOS // 2 and normal.reasons == {"no audio stream": NUM_VIDEOS // 2}
    summary = prepare(half_silent, str(tmp_path / "v"), workers=0, min_seconds=0.5, progress=False, video_only=True)
    assert summary.kept == NUM_VIDEOS and summary.rejected == 0
    with open(summary.manifest_path) as f:
        rows = list(csv.DictReader(f))
    silent = set(silent_rows(NUM_VIDEOS, 0.5, 0))
    assert [r["has_audio"] for r in rows] == ["0" if i in silent else "1" for i in range(NUM_VIDEOS)]
    manifest = read_manifest(summary.manifest_path)
    with pytest.raises(ManifestError, match="6 of 12 rows have no audio stream.*video-only"):
        ClipDataset(manifest, video=VideoConfig(frames=4, crop=32))  # an audio reader refuses it
    video_only = ClipDataset(manifest, video=VideoConfig(frames=4, crop=32), mode="eval", audio=False)
    item = video_only[(0, 0, sorted(silent)[0])]
    assert "audio" not in item and not bool(item["bad"]) and item["video"].shape == (3, 4, 32, 32)
    with pytest.raises(Exception, match="video_only.*extract_audio"):
        prepare(half_silent, str(tmp_path / "x"), workers=0, progress=False, video_only=True, extract_audio="wav")


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_video_only_protocols_run_on_a_half_silent_set_and_score_each_test_video_once(half_silent, tmp_path,
                                                                                       protocol):
    name = "demo-linear" if protocol == "linear" else "demo-finetune"
    cfg = _cfg(name, half_silent, "data.audio.stats=/nonexistent/stats.npz")  # never read: video only
    runner = run_linear_eval if protocol == "linear" else run_finetune
    result = _run(runner, cfg, _tiny_encoder(), tmp_path / protocol)
    saved = json.loads((tmp_path / protocol / "results.json").read_text())
    assert saved["num_test_videos"] == TEST_VIDEOS and saved["num_test"] == TEST_VIDEOS * CLIPS
    assert saved["num_excluded_test_videos"] == 0 and saved["excluded_test_videos"] == []
    top1 = result.video_top1 if protocol == "finetune" else result.video_top1["block4"]
    assert top1 * TEST_VIDEOS == pytest.approx(round(top1 * TEST_VIDEOS))  # a share of 3 videos
    if protocol == "linear":
        assert result.blocks == ["block1", "block2", "block3", "block4"]
        assert saved["feature_sizes"] == {"block1": 4 * 144, "block2": 8 * 64, "block3": 16 * 36, "block4": 32 * 16}


def _test_manifest_with_a_broken_video(half_silent, tmp_path):
    rows = read_manifest(half_silent)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    path = tmp_path / "test.csv"
    with open(path, "w") as f:
        f.write("path,label\n")
        for i in range(3):
            f.write(f"{rows.path(i)},{rows.rows[i]['label']}\n")
        f.write(f"{broken},{rows.rows[0]['label']}\n")
    return str(path), str(broken)


def test_a_broken_test_video_is_an_error_naming_it_or_excluded_and_listed(half_silent, tmp_path):
    test_manifest, broken = _test_manifest_with_a_broken_video(half_silent, tmp_path)
    cfg = _cfg("demo-finetune", half_silent, f"data.test_manifest={test_manifest}")
    with pytest.raises(BadTestVideo, match=f"test video {broken} cannot be read.*on_bad_test_video=exclude"):
        _run(run_finetune, cfg, _tiny_encoder(), tmp_path / "error")
    cfg = _cfg("demo-linear", half_silent, f"data.test_manifest={test_manifest}", "data.on_bad_test_video=exclude")
    result = _run(run_linear_eval, cfg, _tiny_encoder(), tmp_path / "exclude")
    saved = json.loads((tmp_path / "exclude" / "results.json").read_text())
    assert saved["num_test_videos"] == 3 and saved["num_test"] == 3 * CLIPS
    assert saved["num_excluded_test_videos"] == 1 and saved["excluded_test_videos"][0]["path"] == broken
    assert "1 unreadable test videos excluded" in result.format()


def test_the_eval_loader_never_replaces_a_test_video(half_silent, tmp_path):
    test_manifest, broken = _test_manifest_with_a_broken_video(half_silent, tmp_path)
    manifest = read_manifest(test_manifest)
    dataset = ClipDataset(manifest, video=VideoConfig(frames=4, crop=32), mode="eval", clips_per_video=3, audio=False)
    loader = CPULoader(dataset, batch_size=5, workers=0, on_bad="exclude")
    index = torch.cat([b["index"] for b in loader])
    assert index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # each readable video, 3 clips, none twice
    assert loader.bad_videos == [3] and loader.bad_files[0][0] == broken


def test_short_clips_are_padded_by_repeating_their_frames(tmp_path):
    video = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    padded = pad_frames_cyclically(video, 8)
    expected = [t % 3 for t in range(8)]  # the reference: the clip, then its own start again, until long enough
    assert padded[0, :, 0, 0].tolist() == expected and padded.shape == (2, 8, 2, 2)
    assert pad_frames_cyclically(video, 3) is video
    manifest = make_dataset(str(tmp_path / "short"), num_videos=2, num_classes=1, seconds=0.25, size=(32, 32), workers=1)
    config = VideoConfig(frames=8, fps=16, crop=32)  # 0.5 s clips from 0.25 s (4-frame) videos
    rows = read_manifest(manifest)
    with pytest.raises(ValueError, match="shorter than the 0.50 s"):
        ClipDataset(rows, video=config, mode="eval", audio=False).load(0, 0, 0)
    clip = ClipDataset(rows, video=config, mode="eval", audio=False, pad_short=True).load(0, 0, 0).video
    assert clip.shape == (3, 8, 32, 32)
    assert torch.equal(clip[:, 4:], clip[:, :4]) and not torch.equal(clip[:, 0], clip[:, 3])


def test_linear_probe_feature_sizes_match_the_reference():
    # The reference's Kinetics linear config (R(2+1)D-18, 8 x 224^2): AdaptiveMaxPool3d to (1, 12, 12),
    # (1, 8, 8), (1, 6, 6), (1, 4, 4) on conv2x..conv5x, feat_dims 9216, 8192, 9216, 8192.
    reference = {"block1": 9216, "block2": 8192, "block3": 9216, "block4": 8192}
    encoder = VideoEncoder(depth="table6", width=64)
    sizes = probe_feature_sizes(encoder, (3, 8, 224, 224), blocks=list(reference))
    assert sizes == reference
    channels = {"block1": 64, "block2": 128, "block3": 256, "block4": 512}
    assert all(channels[b] * REFERENCE_GRIDS[b][1] * REFERENCE_GRIDS[b][2] == reference[b] for b in reference)
    assert probe_feature_sizes(encoder, (3, 8, 224, 224), "global_max", list(reference)) == channels
    # the analysis network at 16 x 112^2 gets the same sizes (the grids are the pooling's output)
    assert probe_feature_sizes(VideoEncoder(depth="table5"), (3, 16, 112, 112), blocks=list(reference)) == reference


def test_reference_probe_normalises_with_affine_batchnorm_and_backbone_bn_in_train_mode(half_silent, tmp_path):
    encoder = _tiny_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = _cfg("demo-linear", half_silent)
    result = _run(run_linear_eval, cfg, encoder, tmp_path / "ref")
    norms = result.model.norms
    assert all(isinstance(n, torch.nn.BatchNorm1d) and n.affine for n in norms)
    after = encoder.state_dict()
    convs = [k for k, v in before.items() if v.dim() == 5]
    assert all(torch.equal(after[k], before[k]) for k in convs)  # the encoder's weights are frozen
    running = [k for k in before if k.endswith("running_mean")]
    assert any(not torch.equal(after[k], before[k]) for k in running)  # its BN statistics followed the batches
    encoder = _tiny_encoder()
    cfg = _cfg("demo-linear", half_silent, "linear.variant=global_max", "linear.backbone_bn=eval",
               "linear.blocks=[conv1,block4]")
    cheap = _run(run_linear_eval, cfg, encoder, tmp_path / "cheap")
    assert cheap.feature_sizes == {"conv1": 4, "block4": 32} and not cheap.model.norms[0].affine
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    with pytest.raises(Exception, match="linear.blocks.*block5.*not blocks of the video encoder.*conv1.*block1"):
        _run(run_linear_eval, _cfg("demo-linear", half_silent, "linear.blocks=[block5]"), _tiny_encoder(),
             tmp_path / "bad")


def test_finetune_warmup_trains_the_classifier_alone_first(half_silent, tmp_path, monkeypatch):
    import avidfast.eval.finetune as finetune

    seen = []  # (phase, encoder weights, classifier weight) after every epoch
    real = finetune._train_epoch

    def spy(cfg, model, *args):
        out = real(cfg, model, *args)
        seen.append((args[-1], {k: v.clone() for k, v in model.encoder.state_dict().items()},
                     model.classifier.weight.detach().clone()))
        return out

    monkeypatch.setattr(finetune, "_train_epoch", spy)
    cfg = _cfg("demo-finetune", half_silent, "finetune.warmup_epochs=2", "finetune.dropout=0")
    encoder = _tiny_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = _run(finetune.run_finetune, cfg, encoder, tmp_path / "warm")
    assert [phase for phase, _, _ in seen] == ["warmup", "warmup", "finetune"]
    assert len(result.warmup_loss) == 2 and len(result.train_loss) == 1
    convs = [k for k, v in before.items() if v.dim() == 5]
    warm = seen[1][1]
    assert all(torch.equal(warm[k], before[k]) for k in convs)  # warm-up: the encoder's weights stay
    assert not torch.equal(seen[0][2], seen[1][2])  # while the classifier trains
    assert not torch.equal(seen[2][1][convs[0]], before[convs[0]])  # then the whole network trains
    assert result.num_train == 3 * 3 * 3  # 3 epochs (2 warm-up) of 3 batches of 3 (9 training videos)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One step of Cross-AVID at width 4 on 4 audio-visual clips: an avidfast checkpoint to load."""
    from avidfast.config import load_config
    from avidfast.train.loop import train

    root = tmp_path_factory.mktemp("ckpt")
    manifest = make_dataset(str(root / "av"), num_videos=4, num_classes=2, seconds=2.0, size=(64, 48), workers=1)
    cfg = load_config("demo", [f"data.manifest={manifest}", f"out_dir={root / 'train'}", "model.width=4",
                               "optim.epochs=1", "optim.batch_size=4", "loss.num_negatives=2", "data.workers=0",
                               "train.progress=false"])
    train(cfg, max_steps=1)
    return str(root / "train" / "checkpoints" / "last.pt")


def test_folds_run_each_split_and_report_every_fold_and_mean_std(half_silent, checkpoint, tmp_path, capsys):
    import statistics

    rows = read_manifest(half_silent)
    for fold in (1, 2):  # two splits of the 12 videos: a different third held out per fold
        for split in ("train", "test"):
            with open(tmp_path / f"{split}{fold}.csv", "w") as f:
                f.write("path,label\n")
                for i in range(len(rows)):
                    if (i % 3 == fold - 1) == (split == "test"):
                        f.write(f"{rows.path(i)},{rows.rows[i]['label']}\n")
    out = tmp_path / "folds"
    args = ["eval", "finetune", "demo-finetune", "--checkpoint", checkpoint, "--folds", "1", "2",
            "--set", f"data.train_manifest={tmp_path}/train{{fold}}.csv",
            "--set", f"data.test_manifest={tmp_path}/test{{fold}}.csv", "--set", f"out_dir={out}"]
    for override in SMALL:
        args += ["--set", override]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert summary["folds"] == [1, 2] and "mean +- std" in printed
    per_fold = {f: json.loads((out / f"fold-{f}" / "results.json").read_text()) for f in (1, 2)}
    for f in (1, 2):
        assert per_fold[f]["num_test_videos"] == 4 and per_fold[f]["num_test"] == 4 * CLIPS
        assert summary["per_fold"][str(f)]["video_top1"] == per_fold[f]["video_top1"]
    for key in ("clip_top1", "video_top1"):
        values = [per_fold[f][key] for f in (1, 2)]
        assert summary[key]["mean"] == pytest.approx(sum(values) / 2)
        assert summary[key]["std"] == pytest.approx(statistics.stdev(values))
    assert main(args) == 2  # the folder holds the summary: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    no_field = ["eval", "finetune", "demo-finetune", "--checkpoint", checkpoint, "--folds", "1",
                "--set", f"data.train_manifest={tmp_path}/train1.csv", "--set", f"out_dir={tmp_path / 'x'}"]
    assert main(no_field) == 2
    assert "do not contain {fold}" in capsys.readouterr().err


def test_retrieval_video_only_scores_the_video_knn_on_a_half_silent_set(half_silent, checkpoint, tmp_path, capsys):
    """`eval retrieval --video-only`: no sound read (silent files fine), every held-out video scored by the
    video k-NN, equal to a brute-force weighted vote over the training videos' embeddings."""
    rows = read_manifest(half_silent)
    manifests = {}
    for split in ("train", "test"):  # the 6 silent clips are spread over both sets
        manifests[split] = tmp_path / f"{split}.csv"
        with open(manifests[split], "w") as f:
            f.write("path,label\n")
            for i in range(len(rows)):
                if (i % 3 == 0) == (split == "test"):
                    f.write(f"{rows.path(i)},{rows.rows[i]['label']}\n")
    silent = set(silent_rows(NUM_VIDEOS, 0.5, 0))
    assert silent & set(range(0, NUM_VIDEOS, 3)) and silent - set(range(0, NUM_VIDEOS, 3))
    common = ["eval", "retrieval", "--checkpoint", checkpoint, "--manifest", str(manifests["test"]),
              "--workers", "0", "--no-progress", "--knn-k", "3", "--batch", "4"]
    assert main(common + ["--train-manifest", str(manifests["train"]), "--out", str(tmp_path / "with_sound")]) == 2
    err = capsys.readouterr().err  # the cross-modal protocol needs sound: a silent test video is named
    assert "test video" in err and "cannot be read" in err
    assert main(common + ["--video-only", "--out", str(tmp_path / "no_train")]) == 2
    assert "--train-manifest" in capsys.readouterr().err
    out = tmp_path / "video_only"
    assert main(common + ["--video-only", "--train-manifest", str(manifests["train"]), "--out", str(out)]) == 0
    assert "video only: 4 held-out videos" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["recall"] is None and list(saved["knn"]) == ["video"] and saved["num_test_videos"] == 4
    assert saved["num_train_videos"] == 8 and saved["settings"]["video_only"] is True
    # the same figure from embeddings computed here and an independent weighted vote
    from avidfast.checkpoints.pretrained import load_pretrained

    model = load_pretrained(checkpoint).model.eval()
    trained = load_pretrained(checkpoint).train_config
    shape = VideoConfig(frames=trained.data.video.frames, fps=trained.data.video.fps, crop=trained.data.video.crop)

    def embed(split):
        manifest = read_manifest(str(manifests[split]))
        dataset = ClipDataset(manifest, video=shape, mode="eval", clips_per_video=1, audio=False,
                              classes=sorted({str(r["label"]) for r in rows.rows}), pad_short=True)
        items = [dataset[(0, i, i)] for i in range(len(manifest))]
        with torch.no_grad():
            emb = model.embed_video(torch.stack([it["video"] for it in items]))
        return torch.nn.functional.normalize(emb.double(), dim=1), torch.stack([it["label"] for it in items])

    (train_emb, train_lab), (test_emb, test_lab) = embed("train"), embed("test")
    sims = test_emb @ train_emb.T
    top = sims.topk(3, dim=1)
    votes = torch.zeros(len(test_lab), NUM_CLASSES, dtype=torch.float64)
    votes.scatter_add_(1, train_lab[top.indices], (top.values / 0.07).exp())
    expected = float((votes.argmax(1) == test_lab).double().mean())
    assert saved["knn"]["video"] == pytest.approx(expected)
