"""Retrieval protocol: recall@k and k-NN against brute force, embeddings, `avidfast eval retrieval` end to end."""
import contextlib
import io
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import unit_rows
from media import make_clip

from avidfast.cli import main
from avidfast.data.manifest import read_manifest, write_manifest
from avidfast.eval.retrieval import (ClipEmbeddings, cross_modal_class_precision, cross_modal_recall, embed_clips,
                                     evaluate_retrieval, knn_classify, knn_predict, true_pair_ranks)
from avidfast.checkpoints.reference import model_name_map, reference_name
from avidfast.models.av import AVModel

TINY = [
    "model.width=4", "data.video.frames=4", "data.video.crop=32", "data.workers=0", "optim.batch_size=4",
    "loss.num_negatives=4", "optim.epochs=1", "train.progress=false", "train.channels_last=false",
    "train.precision=fp32",
]


# ---- brute force, in numpy, one query at a time ----

def _normalise(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _per_video(x, index):
    x = _normalise(x)
    return _normalise(np.stack([x[index == v].mean(axis=0) for v in sorted(set(index.tolist()))]))


def brute_positions(queries, candidates):
    """0-based position of candidate i in query i's list sorted by similarity, the pair after its ties."""
    q, c = _normalise(queries), _normalise(candidates)
    positions = []
    for i in range(len(q)):
        s = [float(np.dot(q[i], c[j])) for j in range(len(c))]
        order = sorted(range(len(c)), key=lambda j: (-s[j], j == i))
        positions.append(order.index(i))
    return np.array(positions)


def brute_recall(video, audio, ks, index=None):
    if index is not None:
        video, audio = _per_video(video, index), _per_video(audio, index)
    out = {}
    for name, q, c in (("v2a", video, audio), ("a2v", audio, video)):
        pos = brute_positions(q, c)
        out[name] = {f"R@{k}": float(np.mean(pos < k)) for k in ks}
        out[f"median_{name}"] = float(np.median(pos + 1))
    return out


def brute_knn(train, train_labels, test, k, temperature):
    train, test = _normalise(train), _normalise(test)
    predictions = []
    for q in test:
        s = [float(np.dot(q, t)) for t in train]
        nearest = sorted(range(len(train)), key=lambda j: (-s[j], j))[:k]
        votes = {}
        for j in nearest:
            votes[int(train_labels[j])] = votes.get(int(train_labels[j]), 0.0) + math.exp(s[j] / temperature)
        predictions.append(min(votes, key=lambda c: (-votes[c], c)))
    return np.array(predictions)


def _sign_rows(n, d, generator):
    """(n, d) rows of +-1: few distinct vectors and exactly representable similarities, so many exact ties."""
    return (torch.randint(0, 2, (n, d), generator=generator).double() * 2 - 1)


def _check_recall(video, audio, ks, index=None):
    got = cross_modal_recall(video, audio, ks, index)
    want = brute_recall(video.numpy(), audio.numpy(), ks, None if index is None else index.numpy())
    for direction in ("v2a", "a2v"):
        assert got[direction] == pytest.approx(want[direction], abs=1e-12), direction
        assert got["median_rank"][direction] == pytest.approx(want[f"median_{direction}"])
    return got


# ---- recall ----

def test_recall_matches_brute_force_on_random_and_tied_embeddings():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(3):
        n = int(torch.randint(2, 40, (), generator=g))
        d = int(torch.randint(2, 24, (), generator=g))
        ks = (1, 3, 5, n + 2)
        got = _check_recall(torch.randn(n, d, dtype=torch.float64, generator=g),
                            torch.randn(n, d, dtype=torch.float64, generator=g), ks)
        assert got["num_queries"] == n and got["chance"]["R@3"] == pytest.approx(min(3, n) / n)
        assert got["v2a"][f"R@{n + 2}"] == 1.0
        # +-1 rows in 4 dimensions: at most 16 distinct vectors, ties everywhere
        video, audio = _sign_rows(n, 4, g), _sign_rows(n, 4, g)
        audio[: n // 2] = video[: n // 2]
        _check_recall(video, audio, ks)
    ranks = true_pair_ranks(_normalise_t(video), _normalise_t(audio), chunk=3)  # several chunks
    assert ranks.tolist() == brute_positions(video.numpy(), audio.numpy()).tolist()


def _normalise_t(x):
    return torch.nn.functional.normalize(x, dim=1)


def test_recall_planted_pairs_ties_and_permutations():
    n = 30
    video = unit_rows(n, 16, torch.float64)
    planted = cross_modal_recall(video, video + 0.01 * torch.randn(n, 16, dtype=torch.float64))
    assert planted["v2a"]["R@1"] == 1.0 and planted["a2v"]["R@1"] == 1.0 and planted["median_rank"]["v2a"] == 1.0
    cycle = torch.randperm(n)
    swapped = torch.empty(n, dtype=torch.int64)
    swapped[cycle] = torch.roll(cycle, 1)  # one random n-cycle: no row keeps its own audio
    shuffled = cross_modal_recall(video, video[swapped])
    assert shuffled["v2a"]["R@1"] == 0.0 and shuffled["a2v"]["R@1"] == 0.0
    # every embedding equal: the pair is ranked after all its ties, so nothing is found before k = N
    same = torch.ones(n, 8)
    collapsed = cross_modal_recall(same, same, ks=(1, n - 1, n))
    assert collapsed["v2a"] == {"R@1": 0.0, f"R@{n - 1}": 0.0, f"R@{n}": 1.0}
    assert collapsed["median_rank"]["a2v"] == n


def test_recall_with_clip_index_averages_clips_per_video():
    videos, clips, d = 9, 3, 12
    index = torch.arange(videos).repeat_interleave(clips)[torch.randperm(videos * clips)] * 7 + 5
    centre = unit_rows(videos, d, torch.float64)
    video = unit_rows(videos * clips, d, torch.float64)
    audio = unit_rows(videos * clips, d, torch.float64)
    got = _check_recall(video, audio, (1, 2, 5), index)
    assert got["num_queries"] == videos
    # clips far from their video's own direction, but their mean close to it: found at video level
    rows = (index - 5) // 7
    noisy = centre[rows] + 0.6 * unit_rows(videos * clips, d, torch.float64)
    close = centre[rows] + 0.05 * unit_rows(videos * clips, d, torch.float64)
    assert _check_recall(noisy, close, (1,), index)["v2a"]["R@1"] == 1.0


def test_recall_rejects_bad_input():
    x = unit_rows(5, 4)
    with pytest.raises(ValueError, match="same shape"):
        cross_modal_recall(x, unit_rows(4, 4))
    with pytest.raises(ValueError, match="ks must be"):
        cross_modal_recall(x, x, ks=(0, 1))
    with pytest.raises(ValueError, match="audio holds NaN"):
        cross_modal_recall(x, torch.full((5, 4), float("nan")))
    with pytest.raises(ValueError, match="index must be"):
        cross_modal_recall(x, x, index=torch.arange(4))


# ---- class-level precision@1 ----
def _brute_class_precision(queries, candidates, labels):
    """Per query, one candidate at a time: a hit when some same-class other candidate scores
    strictly above every other-class candidate."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    hits = 0
    for i in range(len(q)):
        same = [float(q[i] @ c[j]) for j in range(len(c)) if j != i and labels[j] == labels[i]]
        other = [float(q[i] @ c[j]) for j in range(len(c)) if labels[j] != labels[i]]
        hits += bool(same) and (not other or max(same) > max(other))
    return hits / len(q)


def test_class_precision_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for rows in (lambda n: torch.randn(n, 6, dtype=torch.float64, generator=g), lambda n: _sign_rows(n, 3, g)):
        n = int(torch.randint(3, 30, (), generator=g))
        labels = torch.randint(0, 4, (n,), generator=g)
        video, audio = rows(n), rows(n)
        got = cross_modal_class_precision(video, audio, labels)
        assert got["v2a"] == pytest.approx(_brute_class_precision(video.numpy(), audio.numpy(), labels.tolist()))
        assert got["a2v"] == pytest.approx(_brute_class_precision(audio.numpy(), video.numpy(), labels.tolist()))
        counts = torch.bincount(labels)[labels].double()
        assert got["chance"] == pytest.approx(float(((counts - 1) / (n - 1)).mean())) and got["num_queries"] == n


def test_class_precision_planted_classes_collapse_and_bad_input():
    labels = torch.arange(4).repeat_interleave(5)
    centres = unit_rows(4, 16, torch.float64)
    video = centres[labels] + 0.05 * unit_rows(20, 16, torch.float64)
    audio = centres[labels] + 0.05 * unit_rows(20, 16, torch.float64)
    assert cross_modal_class_precision(video, audio, labels)["v2a"] == 1.0
    assert cross_modal_class_precision(video, audio[torch.roll(torch.arange(20), 5)], labels)["a2v"] == 0.0
    same = torch.ones(20, 8)  # a collapsed network: every tie counts against the query
    assert cross_modal_class_precision(same, same, labels)["v2a"] == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        cross_modal_class_precision(same[:1], same[:1], labels[:1])
    with pytest.raises(ValueError, match="labels must be"):
        cross_modal_class_precision(same, same, labels[:3])


# ---- k-NN ----

def test_knn_matches_brute_force_with_and_without_ties():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for trial in range(4):
        m = int(torch.randint(3, 50, (), generator=g))
        q = int(torch.randint(1, 30, (), generator=g))
        classes = int(torch.randint(2, 6, (), generator=g))
        k = [1, 5, 20, m + 4][trial]
        temperature = [0.07, 0.5, 1.0, 0.1][trial]
        labels = torch.randint(0, classes, (m,), generator=g)
        if trial % 2:
            train, test = _sign_rows(m, 4, g), _sign_rows(q, 4, g)
        else:
            train = torch.randn(m, 10, dtype=torch.float64, generator=g)
            test = torch.randn(q, 10, dtype=torch.float64, generator=g)
        got = knn_predict(train, labels, test, k=k, temperature=temperature, num_classes=classes, chunk=7)
        want = brute_knn(train.numpy(), labels.numpy(), test.numpy(), k, temperature)
        assert got.tolist() == want.tolist(), (trial, k)
        truth = torch.randint(0, classes, (q,), generator=g)
        accuracy = knn_classify(train, labels, test, truth, k, temperature)
        assert accuracy == pytest.approx(float(np.mean(want == truth.numpy())))


def test_knn_planted_clusters_and_bad_input():
    centres = unit_rows(3, 16, torch.float64)
    labels = torch.arange(3).repeat(10)
    train = centres[labels] + 0.1 * torch.randn(30, 16, dtype=torch.float64)
    test_labels = torch.arange(3).repeat(4)
    test = centres[test_labels] + 0.1 * torch.randn(12, 16, dtype=torch.float64)
    assert knn_classify(train, labels, test, test_labels, k=5) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(train, labels, test, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, test, temperature=0.0)
    with pytest.raises(ValueError, match="train_labels must be"):
        knn_predict(train, labels[:5], test)
    with pytest.raises(ValueError, match="test_labels must be"):
        knn_classify(train, labels, test, test_labels[:3])


def test_evaluate_retrieval_scores_per_video():
    videos, clips, d = 8, 2, 6
    index = torch.arange(videos).repeat_interleave(clips)
    label = index % 3
    test = ClipEmbeddings(unit_rows(videos * clips, d), unit_rows(videos * clips, d), index, label)
    train = ClipEmbeddings(unit_rows(12, d), unit_rows(12, d), torch.arange(12), torch.arange(12) % 3)
    result = evaluate_retrieval(test, train, ks=(1, 5), knn_k=4, temperature=0.1)
    assert result.recall == cross_modal_recall(test.video, test.audio, (1, 5), index)
    per = test.per_video()
    both = torch.cat([train.video, train.audio], 1), torch.cat([per.video, per.audio], 1)
    assert result.knn["combined"] == pytest.approx(float(np.mean(
        brute_knn(both[0].numpy(), train.label.numpy(), both[1].numpy(), 4, 0.1) == per.label.numpy())))
    saved = json.loads(json.dumps(result.to_dict()))
    assert saved["num_test_videos"] == videos and saved["num_test_clips"] == 16
    assert saved["knn_chance"] == pytest.approx(1 / 3)
    assert "R@5" in result.format() and "combined" in result.format()
    with pytest.raises(ValueError, match="different labels"):
        ClipEmbeddings(test.video, test.audio, index, torch.arange(videos * clips) % 3).per_video()


def test_embed_clips_matches_the_model_and_restores_its_mode():
    model = AVModel.from_preset("table5", width=4, embed_dim=8).train()
    batches = [{"video": torch.randn(b, 3, 4, 32, 32), "audio": torch.randn(b, 1, 129, 100),
                "index": torch.arange(b) + 10 * i, "label": torch.arange(b) % 2} for i, b in enumerate((3, 2))]
    got = embed_clips(model, batches, progress=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        want_v = torch.cat([model.embed_video(b["video"]) for b in batches])
        want_a = torch.cat([model.embed_audio(b["audio"]) for b in batches])
    assert torch.allclose(got.video, want_v, atol=1e-5) and torch.allclose(got.audio, want_a, atol=1e-5)
    assert got.index.tolist() == [0, 1, 2, 10, 11] and got.label.tolist() == [0, 1, 0, 0, 1]


# ---- the command, end to end on a tiny synthetic set ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained for one epoch on 9 of 12 synthetic videos; the other 3 (one per class) held out."""
    from avidfast.data.synthetic import make_dataset
    from avidfast.config import load_config
    from avidfast.train.loop import train

    root = tmp_path_factory.mktemp("retrieval")
    manifest_path = make_dataset(str(root / "data"), num_videos=12, num_classes=3, seconds=2.0, seed=3,
                                 size=(64, 48), workers=1)
    rows = read_manifest(manifest_path).rows
    held = {next(i for i, r in enumerate(rows) if str(r["label"]) == str(c)) for c in range(3)}
    paths = {"train": str(root / "data" / "train.csv"), "held": str(root / "data" / "held.csv")}
    write_manifest(paths["train"], [r for i, r in enumerate(rows) if i not in held], ["path", "label"])
    write_manifest(paths["held"], [r for i, r in enumerate(rows) if i in held], ["path", "label"])
    result = train(load_config("demo", TINY + [f"data.manifest={paths['train']}", f"out_dir={root / 'run'}"]))
    return dict(paths, checkpoint=result.checkpoint, root=root)


def _args(trained, out, *extra):
    return ["eval", "retrieval", "--checkpoint", trained["checkpoint"], "--manifest", trained["held"],
            "--train-manifest", trained["train"], "--clips-per-video", "2", "--batch", "4", "--workers", "0",
            "--k", "1,2", "--knn-k", "3", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def single_run(trained):
    """`avidfast eval retrieval` in this process: (run folder, what it printed)."""
    out = trained["root"] / "eval"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(_args(trained, out)) == 0
    return out, printed.getvalue()


def test_cli_runs_end_to_end_and_matches_brute_force(trained, single_run):
    from avidfast.eval.config import EvalConfig, EvalDataSection
    from avidfast.eval.data import test_loader
    from avidfast.checkpoints.pretrained import load_pretrained

    out, printed = single_run
    assert "video -> audio" in printed and "k-NN" in printed and "results:" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"] == "retrieval" and saved["classes"] == ["0", "1", "2"]
    assert saved["num_test_videos"] == 3 and saved["num_test_clips"] == 6 and saved["num_train_videos"] == 9
    assert saved["recall"]["chance"] == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}
    assert set(saved["knn"]) == {"video", "audio", "combined"}
    for name in ("config.yaml", "meta.json", "eval.log"):
        assert (out / name).is_file(), name

    # the same clips embedded here (clip shape from the checkpoint: 4 frames, 32 px), scored by brute force
    pretrained = load_pretrained(trained["checkpoint"])
    video = pretrained.train_config.data.video
    assert (video.frames, video.crop) == (4, 32)
    data = EvalDataSection(train_manifest=trained["train"], clips_per_video=2, workers=0)
    data.video.frames, data.video.crop = 4, 32
    data.audio.stats = pretrained.train_config.data.audio.stats  # the training run's, as the command uses
    assert data.audio.stats and os.path.isfile(data.audio.stats)
    cfg = EvalConfig(data=data)
    loader = test_loader(cfg, read_manifest(trained["held"]), None, batch_size=4, audio=True)
    clips = embed_clips(pretrained.model, loader, progress=False)
    assert tuple(clips.video.shape) == (6, 128)
    want = brute_recall(clips.video.numpy(), clips.audio.numpy(), (1, 2), clips.index.numpy())
    for direction in ("v2a", "a2v"):
        assert saved["recall"][direction] == pytest.approx(want[direction], abs=1e-9)

    # the baseline, retrieval only (no --train-manifest)
    random_out = trained["root"] / "eval-random"
    argv = _args(trained, random_out, "--random-init")
    del argv[argv.index("--train-manifest"):argv.index("--train-manifest") + 2]
    assert main(argv) == 0
    random_saved = json.loads((random_out / "results.json").read_text())
    assert random_saved["checkpoint"]["random_init"] is True and random_saved["num_test_videos"] == 3
    assert random_saved["knn"] is None and random_saved["classes"] is None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    try:
        assert main(argv) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_processes_give_the_single_process_result(trained, single_run):
    single, double = single_run[0], trained["root"] / "two"
    mp.spawn(_rank, args=(2, _free_port(), _args(trained, double)), nprocs=2, join=True)
    one = json.loads((single / "results.json").read_text())
    two = json.loads((double / "results.json").read_text())
    assert two["num_test_clips"] == 6 and two["num_train_videos"] == 9
    for direction in ("v2a", "a2v"):
        assert two["recall"][direction] == pytest.approx(one["recall"][direction], abs=1e-6), direction
    assert two["knn"] == pytest.approx(one["knn"], abs=1e-6)


def test_cli_errors_name_the_problem(trained, tmp_path, capsys):
    missing = str(tmp_path / "nope.pt")
    assert main(["eval", "retrieval", "--checkpoint", missing, "--manifest", trained["held"]]) == 2
    assert f"--checkpoint {missing}: no such file" in capsys.readouterr().err
    command = ["eval", "retrieval", "--checkpoint", trained["checkpoint"], "--manifest"]
    assert main(command + [str(tmp_path / "x.csv")]) == 2
    assert "x.csv: no such file" in capsys.readouterr().err

    for i in range(2):
        make_clip(str(tmp_path / f"silent{i}.mp4"), audio=False, seed=i)
    silent = str(tmp_path / "silent.csv")
    write_manifest(silent, [{"path": f"silent{i}.mp4"} for i in range(2)])
    assert main(command + [silent]) == 2
    err = capsys.readouterr().err
    assert f"--manifest {silent}" in err and "no audio stream" in err

    assert main(command + [trained["held"], "--train-manifest", silent]) == 2
    assert f"--train-manifest {silent}: k-NN needs a 'label'" in capsys.readouterr().err

    # a checkpoint of the paper's code holds no training config: the clip shape must be given
    reference = str(tmp_path / "reference.pth.tar")
    model = AVModel.from_preset("table6", width=4, embed_dim=8)
    names = model_name_map()
    torch.save({"model": {"module." + reference_name(key, names): value.transpose(2, 3) if key.startswith("audio.")
                          and value.dim() == 4 else value for key, value in model.state_dict().items()}}, reference)
    command_ref = ["eval", "retrieval", "--checkpoint", reference, "--manifest", trained["held"], "--workers", "0",
                   "--device", "cpu", "--no-progress", "--out", str(tmp_path / "ref")]
    assert main(command_ref + ["--crop", "32"]) == 2
    assert "pass --frames, --audio-preset" in capsys.readouterr().err
    assert main(command_ref + ["--crop", "32", "--frames", "4", "--audio-preset", "table5"]) == 0
    saved = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert saved["checkpoint"]["preset"] == "table6" and saved["num_test_videos"] == 3 and saved["knn"] is None

    for bad in ("0,5", "1,five"):
        with pytest.raises(SystemExit) as exit_info:
            main(command + [trained["held"], "--k", bad])
        assert exit_info.value.code == 2 and "--k" in capsys.readouterr().err
