"""A run never looks finished when it is not (issue 14).

1. Work that cannot make a step is a config error before anything is written.
2. A non-finite loss or gradient never reaches the weights, the banks, Z or a checkpoint; the run
   stops (or skips and counts), and nothing non-finite is resumed or started from.
4. A checkpoint records its manifest; --resume and loss.init_from refuse other rows.
5. The training manifest is found again from anywhere (absolute path, run-relative path,
   fingerprint).
The command-line cases run the real command and check the exit code, the one-line error and that
no checkpoint was written or changed.
"""
import csv
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from avidfast.checkpoints import store as ckpt
from avidfast.config import ConfigError, load_config
from avidfast.data.manifest import manifest_fingerprint, read_manifest
from avidfast.train import loop
from avidfast.train.loop import TrainingError, train
from avidfast.train.step import StepResult, TrainStep
from tiny_training import TINY, tiny_config, tiny_set  # noqa: F401 - tiny_set is a fixture

# epoch 2 runs at lr 1e-3 * 1e35: its first step blows the weights up, its second is NaN
EXPLODES_IN_EPOCH_2 = ["optim.epochs=2", "optim.milestones=[1]", "optim.gamma=1e35"]


def _cli(args, cwd=None):
    """`avidfast ARGS` in a subprocess: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "avidfast.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def _train_cli(manifest, out_dir, *extra, resume=False, cwd=None):
    items = TINY + [f"data.manifest={manifest}", f"out_dir={out_dir}", *extra]
    return _cli(["train", "demo"] + [f"--set={item}" for item in items] + (["--resume"] if resume else []), cwd=cwd)


def _one_line_error(code, stdout, stderr) -> str:
    """The `avidfast: error: ...` line a refused command ends with (exit 2, no traceback)."""
    assert code == 2, stderr
    assert "Traceback" not in stdout + stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("avidfast: error: "), stderr
    return last[len("avidfast: error: "):]


def _digests(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return {}
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def _reversed_manifest(manifest, name="reversed.csv"):
    """A manifest of the same videos in the opposite order, next to ``manifest``."""
    with open(manifest, newline="") as f:
        rows = list(csv.reader(f))
    path = os.path.join(os.path.dirname(manifest), name)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + rows[1:][::-1])
    return path


# 1. work that cannot make a step


def test_an_epoch_without_a_step_is_a_config_error_before_anything_is_written(tiny_set, tmp_path):
    run = tmp_path / "run"
    message = _one_line_error(*_train_cli(tiny_set, run, "optim.batch_size=9"))
    assert message == ("an epoch makes no training step: it reads the 8 rows of the manifest (optim.samples_per_epoch "
                       "is unset), fewer than one batch of optim.batch_size=9 per process (the incomplete last batch "
                       "is dropped); --set optim.batch_size=8 or less, or --set optim.samples_per_epoch=9 or more")
    message = _one_line_error(*_train_cli(tiny_set, run, "optim.samples_per_epoch=0"))
    assert message == ("optim.samples_per_epoch must be positive (or null: one pass over the manifest), got 0; an "
                       "epoch of no clips makes no step")
    message = _one_line_error(*_train_cli(tiny_set, run, "optim.lr=1e400"))
    assert message == "optim.lr: expected a finite number, got inf"
    assert not run.exists()


def test_the_epoch_size_check_counts_the_processes(tiny_set, tmp_path):
    cfg = tiny_config(tiny_set, tmp_path)
    assert cfg.check_epoch_size(8) == 2 and cfg.check_epoch_size(8, world_size=2) == 1
    assert cfg.check_epoch_size(7, world_size=2) == 1  # 4 clips per rank: the sampler pads by wrapping
    with pytest.raises(ConfigError, match=r"it reads the 6 rows of the manifest .* over 2 processes \(3 each\), fewer "
                                          r"than one batch of optim.batch_size=4 per process .*--set "
                                          r"optim.batch_size=3 or less, or --set optim.samples_per_epoch=8 or more$"):
        cfg.check_epoch_size(6, world_size=2)
    spe = tiny_config(tiny_set, tmp_path, "optim.samples_per_epoch=3")
    with pytest.raises(ConfigError, match=r"it reads optim.samples_per_epoch=3, fewer than one batch"):
        spe.check_epoch_size(1000)
    with pytest.raises(ConfigError, match="optim.batch_size: expected an integer, got inf"):
        load_config("demo", ["optim.batch_size=.inf"])


# 2. non-finite steps


def test_a_nan_step_stops_the_run_and_keeps_the_last_checkpoint(tiny_set, tmp_path):
    run = tmp_path / "run"
    code, _, stderr = _train_cli(tiny_set, run, "optim.epochs=1")
    assert code == 0, stderr
    before = _digests(run)
    assert set(before) == {"last.pt", "epoch_0001.pt"}
    message = _one_line_error(*_train_cli(tiny_set, run, *EXPLODES_IN_EPOCH_2, resume=True))
    assert message.startswith("non-finite loss (nan) and gradients on rank 0 at step 4 (epoch 2, batch 2): the step "
                              "was not applied and nothing was saved after it; the last checkpoint, "
                              f"{run}/checkpoints/last.pt (end of epoch 1), is kept as it was; try a lower optim.lr")
    assert _digests(run) == before
    # resuming again starts from the finite end of epoch 1, and stops at the same step
    message = _one_line_error(*_train_cli(tiny_set, run, *EXPLODES_IN_EPOCH_2, resume=True))
    assert "at step 4 (epoch 2, batch 2)" in message and _digests(run) == before
    assert not ckpt.non_finite_tensors(ckpt.load_checkpoint(str(run / "checkpoints" / "last.pt")))


class _PoisonedStep(TrainStep):
    """Feeds NaN clips at the given calls (1-based)."""

    poisoned = {2}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls in self.poisoned:
            batch = dict(batch, video=torch.full_like(batch["video"], float("nan")))
        return super().__call__(batch)


class _NoOpStep(_PoisonedStep):
    """Does nothing at all at the poisoned calls: what a skipped step must amount to."""

    def __call__(self, batch):
        if self.calls + 1 in self.poisoned:
            self.calls += 1
            return StepResult(torch.tensor(float("nan")), {}, batch["index"].numel(), applied=False, problem="test")
        return super().__call__(batch)


def test_a_nan_first_step_stops_before_any_checkpoint(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setattr(_PoisonedStep, "poisoned", {1})
    monkeypatch.setattr(loop, "TrainStep", _PoisonedStep)
    with pytest.raises(TrainingError, match=r"^non-finite loss \(nan\) and gradients on rank 0 at step 1 \(epoch 1, "
                                            r"batch 1\): the step was not applied and nothing was saved after it; no "
                                            r"checkpoint was written before it; .*train.non_finite=skip"):
        train(tiny_config(tiny_set, tmp_path / "run"))
    assert _digests(tmp_path / "run") == {}


def test_skipped_steps_change_nothing_and_are_counted(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "TrainStep", _PoisonedStep)
    skipped = train(tiny_config(tiny_set, tmp_path / "skip", "train.non_finite=skip"))
    monkeypatch.setattr(loop, "TrainStep", _NoOpStep)
    reference = train(tiny_config(tiny_set, tmp_path / "noop", "train.non_finite=skip"))
    assert skipped.steps == reference.steps == 3 and skipped.epochs_done == 2 and skipped.skipped_steps == 1
    a, b = (ckpt.load_checkpoint(str(tmp_path / name / "checkpoints" / "last.pt")) for name in ("skip", "noop"))
    assert a["skipped_steps"] == b["skipped_steps"] == 1
    for part in ("model", "criterion"):  # BatchNorm statistics, banks, Z and step included
        for key, value in b[part].items():
            assert torch.equal(a[part][key], value), f"{part}.{key}"
    for key, value in b["optimizer"]["state"][0].items():
        assert torch.equal(a["optimizer"]["state"][0][key], value), key
    assert int(a["criterion"]["step"]) == 3
    log = (tmp_path / "skip" / "train.log").read_text()
    assert "at step 2 (epoch 1, batch 2): step skipped (1 in a row, 1 in this run)" in log
    assert "(1 non-finite step(s) skipped)" in log


def test_skipping_is_bounded(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setattr(_PoisonedStep, "poisoned", {2, 3, 4})
    monkeypatch.setattr(loop, "TrainStep", _PoisonedStep)
    with pytest.raises(TrainingError, match=r"at step 2 \(epoch 2, batch 2\): 3 steps in a row were not finite \(more "
                                            r"than train.max_skipped_steps=2\); nothing was saved after them; the last "
                                            r"checkpoint, .*last.pt \(end of epoch 1\), is kept as it was"):
        train(tiny_config(tiny_set, tmp_path / "run", "train.non_finite=skip", "train.max_skipped_steps=2"))


def test_an_epoch_of_skipped_steps_is_not_finished(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setattr(_PoisonedStep, "poisoned", {3, 4})
    monkeypatch.setattr(loop, "TrainStep", _PoisonedStep)
    with pytest.raises(TrainingError, match=r"^no step of epoch 2 was finite \(2 skipped\), so its checkpoint was not "
                                            r"written; the last checkpoint, .*last.pt \(end of epoch 1\), is kept"):
        train(tiny_config(tiny_set, tmp_path / "run", "train.non_finite=skip"))
    assert ckpt.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.pt"))["epoch"] == 1


def test_no_checkpoint_is_written_from_a_non_finite_state(tiny_set, tmp_path, monkeypatch):
    class BreaksTheWeights(TrainStep):
        calls = 0

        def __call__(self, batch):
            result = super().__call__(batch)
            BreaksTheWeights.calls += 1
            if BreaksTheWeights.calls == 2:  # the epoch's last step: an optimiser step gone wrong
                with torch.no_grad():
                    next(self.net.parameters()).fill_(float("inf"))
            return result

    monkeypatch.setattr(loop, "TrainStep", BreaksTheWeights)
    with pytest.raises(TrainingError, match=r"^the state at end of epoch 1 holds NaN / inf values \(model\.\S+\), so "
                                            r"no checkpoint was written; no checkpoint was written before it"):
        train(tiny_config(tiny_set, tmp_path / "run", "optim.epochs=1"))
    assert _digests(tmp_path / "run") == {}


def test_resume_and_init_from_refuse_a_non_finite_checkpoint(tiny_set, tmp_path):
    train(tiny_config(tiny_set, tmp_path / "run", "optim.epochs=1"))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = ckpt.load_checkpoint(str(last))
    state["criterion"]["Z"][0] = float("nan")
    torch.save(state, last)
    before = _digests(tmp_path / "run")
    message = _one_line_error(*_train_cli(tiny_set, tmp_path / "run", resume=True))
    assert message == (f"--resume: {last} holds NaN / inf values (criterion.Z) and cannot be continued; copy a finite "
                       "checkpoint of the run (checkpoints/epoch_NNNN.pt or step_NNNNNNNNN.pt) over it, or start a "
                       "new run")
    assert _digests(tmp_path / "run") == before
    cma = ["loss.kind=cma", f"loss.init_from={last}", "loss.num_positives=2", "loss.num_negatives=3",
           "loss.num_negatives_within=2"]
    with pytest.raises(TrainingError, match=r"loss.init_from .*last.pt: holds NaN / inf values \(criterion.Z\); "
                                            r"training cannot start from it"):
        train(tiny_config(tiny_set, tmp_path / "cma", *cma))
    assert not (tmp_path / "cma").exists()


# 4. a checkpoint's memory slots belong to its manifest


def test_the_fingerprint_names_the_rows_wherever_the_set_lies(tiny_set, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(os.path.dirname(tiny_set), moved)
    here, there = read_manifest(tiny_set), read_manifest(str(moved / os.path.basename(tiny_set)))
    assert manifest_fingerprint(here) == manifest_fingerprint(there)
    assert manifest_fingerprint(read_manifest(_reversed_manifest(str(moved / os.path.basename(tiny_set))))) \
        != manifest_fingerprint(here)


def test_resume_refuses_another_manifest(tiny_set, tmp_path):
    run = tmp_path / "run"
    code, _, stderr = _train_cli(tiny_set, run, "optim.epochs=1")
    assert code == 0, stderr
    before = _digests(run)
    other = _reversed_manifest(tiny_set)
    message = _one_line_error(*_train_cli(other, run, resume=True))
    fingerprint = manifest_fingerprint(read_manifest(tiny_set))[:12]
    assert message == (f"--resume {run}/checkpoints/last.pt: it was trained on the manifest {tiny_set} (rows "
                       f"fingerprint {fingerprint}), but data.manifest {other} lists other videos or another order "
                       f"(fingerprint {manifest_fingerprint(read_manifest(other))[:12]}), so memory slot i would "
                       "stand for another video; pass the run's manifest, or --set "
                       "train.allow_manifest_change=true to continue anyway")
    assert _digests(run) == before
    resumed = train(tiny_config(other, run, "train.allow_manifest_change=true"), resume=True)
    assert resumed.steps == 2
    meta = ckpt.load_checkpoint(str(run / "checkpoints" / "last.pt"))["meta"]["manifest"]
    assert meta["path"] == other and meta["rows"] == 8  # the slots now mean the rows of the accepted manifest


def test_init_from_refuses_an_avid_run_of_another_manifest(tiny_set, tmp_path):
    train(tiny_config(tiny_set, tmp_path / "avid", "optim.epochs=1"))
    init = str(tmp_path / "avid" / "checkpoints" / "last.pt")
    cma = ["loss.kind=cma", f"loss.init_from={init}", "loss.num_positives=2", "loss.num_negatives=3",
           "loss.num_negatives_within=2", "optim.epochs=1"]
    with pytest.raises(TrainingError, match=r"^loss.init_from .*last.pt: it was trained on the manifest .* so memory "
                                            r"slot i would stand for another video"):
        train(tiny_config(_reversed_manifest(tiny_set), tmp_path / "cma", *cma))
    assert not (tmp_path / "cma").exists()
    assert train(tiny_config(tiny_set, tmp_path / "cma", *cma)).steps == 2


# 5. the training manifest is found again


def test_eval_memory_finds_the_training_manifest_from_anywhere(tiny_set, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(os.path.dirname(tiny_set), project / "data")
    code, _, stderr = _train_cli("data/manifest.csv", "runs/avid", "optim.epochs=1", cwd=project)
    assert code == 0, stderr
    record = ckpt.load_checkpoint(str(project / "runs/avid/checkpoints/last.pt"))["meta"]["manifest"]
    assert record["path"] == str(project / "data" / "manifest.csv") and record["from_run_dir"] == "../../data/manifest.csv"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def probe(checkpoint, out):
        return _cli(["eval", "memory", "--epochs", "2", "--repeats", "1", "--out", str(tmp_path / out), "--checkpoint",
                     str(checkpoint)], cwd=elsewhere)

    code, _, stderr = probe(project / "runs/avid/checkpoints/last.pt", "eval1")
    assert code == 0, stderr
    # runs and data moved together: found relative to the run folder
    shutil.move(str(project), str(tmp_path / "moved"))
    moved = tmp_path / "moved" / "runs/avid/checkpoints/last.pt"
    code, _, stderr = probe(moved, "eval2")
    assert code == 0, stderr
    # another manifest where the run's was: refused, with the way out
    data = tmp_path / "moved" / "data" / "manifest.csv"
    _reversed_manifest(str(data), "manifest.csv")
    message = _one_line_error(*probe(moved, "eval3"))
    assert message.startswith(f"{moved}: {data} does not list the videos it was trained on (its rows differ")
    assert message.endswith("; pass --labels PATH (the manifest the model was trained on: row i is memory slot i)")
    os.remove(data)
    message = _one_line_error(*probe(moved, "eval4"))
    assert message == (f"{moved}: the manifest it was trained on is not found (looked for {data}, "
                       f"{project}/data/manifest.csv, data/manifest.csv); pass --labels PATH (that manifest: row i is "
                       "memory slot i)")
