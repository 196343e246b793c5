"""Tar shards: writing, the shard-grouped epoch order, the CPU pipeline over shards, bad members."""
import json
import os
import shutil
import tarfile

import pytest
import torch

from avidfast.data.cpu_pipeline import BadTestVideo, ClipDataset, CPULoader, TooManyBadSamples
from avidfast.data.manifest import read_manifest
from avidfast.data.prepare import prepare
from avidfast.data.shards.dataset import ShardClipDataset
from avidfast.data.shards.index import ShardError, read_index
from avidfast.data.shards.order import ShardGroupedSampler
from avidfast.data.synthetic import make_dataset
from avidfast.data.video import VideoConfig

SMALL = VideoConfig(frames=8, crop=64)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """8 labelled clips prepared with extracted WAV audio, written as shards of about 2 samples."""
    folder = tmp_path_factory.mktemp("shards")
    source = make_dataset(str(folder / "syn"), 8, 2, seconds=2.0, seed=3, size=(96, 72), workers=1)
    out = str(folder / "out")
    prepare(source, out, workers=0, extract_audio="wav", min_seconds=1.0, progress=False)
    manifest = read_manifest(os.path.join(out, "manifest.csv"))
    largest = max(os.path.getsize(manifest.path(i)) + os.path.getsize(manifest.audio_path(i)) + 4096
                  for i in range(len(manifest)))
    summary = prepare(source, out, workers=0, extract_audio="wav", min_seconds=1.0, progress=False, shards=True,
                      shard_bytes=2 * largest)  # a rerun: only the shards are new
    assert summary.shards == os.path.join(out, "shards", "index.npz") and summary.processed == 0
    assert len(read_index(summary.shards).shards) >= 4
    return manifest, os.path.join(out, "shards")


def _copy(shards, tmp_path):
    target = str(tmp_path / "shards")
    shutil.copytree(shards, target)
    return target


def test_shards_are_plain_tars_with_a_sample_per_key(prepared):
    manifest, shards = prepared
    index = read_index(shards)
    assert sorted(s.slot for s in index.samples) == list(range(len(manifest)))
    assert [s.slot for s in index.samples] != list(range(len(manifest)))  # written in a mixed order
    for number, sample in enumerate(index.samples):
        with tarfile.open(index.shard_path(sample.shard)) as tar:
            names = tar.getnames()
            assert {f"{sample.key}.mp4", f"{sample.key}.wav", f"{sample.key}.json"} <= set(names)
            meta = json.load(tar.extractfile(f"{sample.key}.json"))
            assert meta["index"] == sample.slot and meta["label"] == manifest.rows[sample.slot]["label"]
            data = tar.extractfile(f"{sample.key}.mp4").read()
        with open(manifest.path(sample.slot), "rb") as f:
            assert f.read() == data
        offset, size = sample.members["mp4"]
        with open(index.shard_path(sample.shard), "rb") as f:
            f.seek(offset)
            assert f.read(size) == data  # the index points at the member's bytes


def test_slot_and_label_come_from_the_sample_and_clips_match_the_files(prepared):
    manifest, shards = prepared
    from_shards = ShardClipDataset(shards, video=SMALL)
    from_files = ClipDataset(manifest, video=SMALL)
    index = read_index(shards)
    for number in range(len(index)):
        a = from_shards[(2, 10 + number, number)]
        slot = index.samples[number].slot
        b = from_files[(2, 10 + number, slot)]
        assert int(a["index"]) == slot and int(a["label"]) == int(b["label"])
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])


def test_every_slot_once_per_epoch_over_two_ranks_and_two_workers(prepared):
    manifest, shards = prepared
    seen = []
    for rank in range(2):
        loader = CPULoader(ShardClipDataset(shards, video=SMALL, seed=5), batch_size=2, workers=2, rank=rank,
                           world_size=2, timeout=120)
        loader.set_epoch(3)
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 4
    assert sorted(seen[0] + seen[1]) == list(range(len(manifest)))


def test_each_rank_and_worker_reads_its_own_shards():
    shard_of = [i // 4 for i in range(64)]  # 16 shards of 4 samples
    readers = {}
    for rank in range(2):
        sampler = ShardGroupedSampler(shard_of, rank=rank, world_size=2, seed=1, batch_size=4, workers=2)
        sampler.set_epoch(7)
        pairs = list(sampler)
        for k in range(0, len(pairs), 4):  # the DataLoader hands batch k to worker k mod 2
            readers.setdefault((rank, k // 4 % 2), set()).update(shard_of[i] for _, i in pairs[k:k + 4])
        assert len({p for p, _ in pairs}) == len(pairs) == 32
    assert all(len(shards) == 4 for shards in readers.values())
    assert set().union(*readers.values()) == set(range(16))
    assert sum(len(shards) for shards in readers.values()) == 16  # no shard read by two readers


def test_padding_when_ranks_do_not_divide_the_samples():
    shard_of = [i // 3 for i in range(7)]
    visits = []
    for rank in range(3):
        sampler = ShardGroupedSampler(shard_of, rank=rank, world_size=3, seed=2, batch_size=2, workers=2)
        pairs = list(sampler)
        assert len(pairs) == len(sampler) == 3
        visits += pairs
    assert sorted({i for _, i in visits}) == list(range(7))
    assert len(visits) == 9  # 7 samples, 2 read twice (wrapped from the start of the order)
    assert len({p for p, _ in visits}) == 9  # every read has its own position, hence its own augmentation


def test_resume_mid_epoch_is_exact(prepared):
    _, shards = prepared
    loader = CPULoader(ShardClipDataset(shards, video=SMALL, seed=9), batch_size=2, workers=2, timeout=120)
    loader.set_epoch(1)
    full = list(loader)
    resumed = CPULoader(ShardClipDataset(shards, video=SMALL, seed=9), batch_size=2, workers=2, timeout=120)
    resumed.set_epoch(1, skip_batches=1)
    rest = list(resumed)
    assert len(rest) == len(full) - 1
    for a, b in zip(full[1:], rest):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
        assert torch.equal(a["audio"], b["audio"])


def test_corrupt_and_truncated_members_are_named_counted_and_bounded(prepared, tmp_path):
    _, shards = prepared
    shards = _copy(shards, tmp_path)
    index = read_index(shards)
    victim = index.samples[0]
    offset, size = victim.members["mp4"]
    with open(index.shard_path(victim.shard), "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)  # the video member's bytes are gone
    last = index.samples[-1]
    with open(index.shard_path(last.shard), "r+b") as f:
        f.truncate(last.members["json"][0] + 1)  # the last sample's JSON is cut short
    dataset = ShardClipDataset(shards, video=SMALL, mode="train")
    loader = CPULoader(dataset, batch_size=len(index), workers=0, max_bad_fraction=1.0)
    (batch,) = list(loader)
    named = {path: reason for path, reason in loader.bad_files}
    corrupt = f"{index.shard_path(victim.shard)}:{victim.key}"  # the sample is named, its member in the reason
    truncated = f"{index.shard_path(last.shard)}:{last.key}"
    assert corrupt in named and f"{victim.key}.mp4" in named[corrupt]
    assert truncated in named and f"{last.key}.json: shard truncated" in named[truncated]
    assert loader.bad_samples == len(loader.bad_files) == 2
    assert victim.slot not in batch["index"].tolist() and last.slot not in batch["index"].tolist()
    strict = CPULoader(ShardClipDataset(shards, video=SMALL, mode="train"), batch_size=2, workers=0,
                       max_bad_fraction=0.1)
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction"):
        list(strict)
    # evaluation never replaces a sample: the bad member is an error naming it, or excluded and listed
    with pytest.raises(BadTestVideo, match=f"{victim.key}"):
        list(CPULoader(ShardClipDataset(shards, video=SMALL, mode="eval"), batch_size=2, workers=0))
    excluding = CPULoader(ShardClipDataset(shards, video=SMALL, mode="eval"), batch_size=2, workers=0,
                          on_bad="exclude")
    list(excluding)
    assert {path for path, _ in excluding.bad_files} == {corrupt, truncated}


def test_a_missing_shard_is_an_error_naming_it(prepared, tmp_path):
    _, shards = prepared
    shards = _copy(shards, tmp_path)
    dataset = ShardClipDataset(shards, video=SMALL)
    missing = dataset.index.shard_path(1)
    os.unlink(missing)
    with pytest.raises(ShardError, match=f"shard {missing} .*missing"):
        ShardClipDataset(shards, video=SMALL)
    loader = CPULoader(dataset, batch_size=2, workers=2, timeout=120)  # built before the shard went away
    with pytest.raises(ShardError, match=f"shard {missing} is missing"):
        list(loader)


def test_training_reads_the_shards_of_its_manifest(prepared, tmp_path):
    from avidfast.config import load_config
    from avidfast.errors import TrainingError
    from avidfast.train.loop import train

    manifest, shards = prepared
    tiny = ["model.width=4", "data.video.frames=4", "data.video.crop=32", "data.workers=0", "optim.batch_size=4",
            "loss.num_negatives=4", "optim.epochs=1", "train.progress=false", "train.channels_last=false",
            "train.precision=fp32"]
    manifest_path = os.path.join(manifest.root, "manifest.csv")
    result = train(load_config("demo", tiny + [f"data.manifest={manifest_path}", f"data.shards={shards}",
                                               f"out_dir={tmp_path / 'run'}"]))
    assert result.steps == len(manifest) // 4
    other = tmp_path / "other.csv"
    other.write_text("path,label\n" + "".join(f"{manifest.rows[i]['path']},{manifest.rows[i]['label']}\n"
                                               for i in reversed(range(len(manifest)))))
    with pytest.raises(TrainingError, match="was not written from data.manifest"):
        train(load_config("demo", tiny + [f"data.manifest={other}", f"data.shards={shards}", "data.root=" + manifest.root,
                                          f"out_dir={tmp_path / 'run2'}"]))
