"""Checkpoints that survive a full disk, step checkpoints and their pruning, --resume auto (issue 18).

The full disk is simulated below torch.save: the file the checkpoint is written to accepts a number
of bytes, then refuses the next write with ENOSPC, as a full file system does (torch.save itself
reports that as a RuntimeError about the stream position; the error must still say "No space left
on device" and name the file).
"""
import errno
import os

import pytest
import torch

from avidfast.checkpoints import store as ckpt
from avidfast.config import ConfigError, load_config
from avidfast.train.loop import train
from avidfast.train.resume import step_checkpoints
from tiny_training import tiny_config, tiny_set  # noqa: F401 - tiny_set is a fixture


class _FullDisk:
    """A file that takes ``room`` bytes, then refuses every write with ENOSPC."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(memoryview(data)[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def _disk_full_at_save(monkeypatch, failing_call):
    """The ``failing_call``-th checkpoint write (1-based) meets a full disk halfway."""
    real = ckpt.atomic_write
    calls = []

    def atomic_write(path, write):
        calls.append(path)
        if len(calls) != failing_call:
            return real(path, write)
        return real(path, lambda f: write(_FullDisk(f, 100_000)))

    monkeypatch.setattr(ckpt, "atomic_write", atomic_write)
    return calls


def _same(a, b):
    for part in ("model", "criterion"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_set, tmp_path, monkeypatch):
    # 8 clips, 4 a batch: 2 steps an epoch; a step checkpoint after step 1 and 3, epoch ends after 2 and 4
    run = tmp_path / "run"
    folder = run / "checkpoints"
    calls = _disk_full_at_save(monkeypatch, failing_call=3)  # step 1, end of epoch 1, then step 3
    with pytest.raises(ckpt.CheckpointWriteError) as refused:
        train(tiny_config(tiny_set, run, "train.checkpoint_every=1"))
    message = str(refused.value)
    assert calls[-1] == str(folder / "step_000000003.pt")
    assert message.startswith(f"checkpoint {folder / 'step_000000003.pt'}: could not be written (No space left on "
                              "device); free space on that file system")
    assert f"the last checkpoint, {folder / 'last.pt'} (end of epoch 1), is kept as it was" in message
    assert sorted(os.listdir(folder)) == ["last.pt", "step_000000001.pt"]  # no partial or temporary file
    kept = ckpt.load_checkpoint(str(folder / "last.pt"))
    assert (kept["epoch"], kept["batches_done"], int(kept["criterion"]["step"])) == (1, 0, 2)

    monkeypatch.undo()  # space again: --resume auto continues, and ends where an uninterrupted run does
    resumed = train(tiny_config(tiny_set, run, "train.checkpoint_every=1"), resume="auto")
    assert resumed.steps == 2
    straight = train(tiny_config(tiny_set, tmp_path / "straight"))
    _same(ckpt.load_checkpoint(str(folder / "last.pt")), ckpt.load_checkpoint(straight.checkpoint))


def test_step_checkpoints_are_pruned_and_last_is_the_newest(tiny_set, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(tiny_set, run, "optim.epochs=3", "optim.batch_size=2", "train.checkpoint_every=1",
                        "train.keep_step_checkpoints=2"), max_steps=7)
    folder = str(run / "checkpoints")
    # 4 steps an epoch: step files after steps 1-3 and 5-7 (4 ends epoch 1); the two newest are kept
    assert result.steps == 7 and step_checkpoints(folder) == ["step_000000006.pt", "step_000000007.pt"]
    last = ckpt.load_checkpoint(os.path.join(folder, "last.pt"))
    assert (last["epoch"], last["batches_done"], int(last["criterion"]["step"])) == (1, 3, 7)
    assert os.path.samefile(os.path.join(folder, "last.pt"), os.path.join(folder, "step_000000007.pt"))


def test_resume_auto_starts_a_new_run_and_continues_an_old_one(tiny_set, tmp_path):
    run = tmp_path / "run"
    first = train(tiny_config(tiny_set, run, "optim.epochs=1"), resume="auto")  # nothing to resume: starts
    assert first.steps == 2
    second = train(tiny_config(tiny_set, run), resume="auto")  # continues with epoch 2
    assert second.steps == 2 and second.epochs_done == 2
    with open(run / "metrics.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["step", "1", "2", "3", "4"]


def test_checkpoint_settings_are_checked():
    with pytest.raises(ConfigError, match="train.checkpoint_every must be 0 .* got -1"):
        load_config("demo", ["train.checkpoint_every=-1"])
    with pytest.raises(ConfigError, match="train.keep_step_checkpoints must be 1 or more, got 0"):
        load_config("demo", ["train.keep_step_checkpoints=0"])
    with pytest.raises(ConfigError, match="train.collective_timeout must be a positive number of seconds"):
        load_config("demo", ["train.collective_timeout=0"])
