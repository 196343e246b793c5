"""Every command line of README.md's ```sh blocks runs, as written, on a tiny synthetic set.

The README's `avidfast ...` commands (and `torchrun ... -m avidfast.cli ...`) are read from the
file, joined across `\\` continuations, without their `# comments`. Each must have an entry in
``COMMANDS`` below, which says how this test runs it: the README's placeholders replaced
(``CKPT``, ``--set ...``, the paper's checkpoint file names, ...) and sizes made tiny by options
appended after the README's own (argparse and ``--set`` keep the last value), or why it is skipped
(a torchrun line needs several processes). A README command without an entry, or an entry whose
command left the README, fails the test: a new command must be exercised here.

The commands run in README order, in one folder, each in a subprocess (``python -m avidfast.cli``),
and must exit 0; where a command's point is a file, the file is checked. Set-up: a synthetic set
(``raw/``) and what the README assumes exists (UCF-101 / HMDB-51 split lists and videos, Kinetics
and AudioSet CSVs, the paper's checkpoint files in their layout, labelled manifests). Takes about
two minutes on two cores.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

VIDEOS, CLASSES = 8, 2
TINY_TRAIN = ["model.width=4", "data.video.frames=4", "data.video.crop=32", "data.workers=0", "optim.batch_size=null",
              "optim.global_batch_size=4", "loss.num_negatives=4", "optim.epochs=1", "optim.samples_per_epoch=null", "train.progress=false",
              "train.precision=fp32", "train.channels_last=false", "train.log_every=1"]
TINY_CMA = TINY_TRAIN + ["loss.num_negatives_within=2", "loss.num_positives=2", "loss.resample_every=1"]
TINY_EVAL = ["data.video.frames=4", "data.video.crop=32", "data.workers=0", "data.clips_per_video=1", "optim.epochs=1",
             "optim.global_batch_size=4", "optim.samples_per_epoch=null", "run.progress=false", "run.device=cpu"]
QUIET_DATA = ["--workers", "0", "--quiet"]


def sets(*items: str) -> List[str]:
    return [arg for item in items for arg in ("--set", item)]


def cpu_pipeline() -> List[str]:
    """What a DALI config needs on a machine without DALI on a GPU (the README's comment says so)."""
    try:
        import nvidia.dali  # noqa: F401
        dali = torch.cuda.is_available()
    except ImportError:
        dali = False
    return [] if dali else sets("data.pipeline=cpu")


@dataclass
class Run:
    """How this test runs one README command."""

    replace: Dict[str, str] = field(default_factory=dict)  # README text -> this test's
    append: List[str] = field(default_factory=list)  # options after the README's (tiny sizes)
    creates: Tuple[str, ...] = ()  # files the command must write
    skip: Optional[str] = None  # why it is not run


CKPT = "runs/avid-s6-kinetics/checkpoints/last.pt"
TRAIN_DATA = "--set data.manifest=prep/manifest.csv --set data.audio.stats=prep/manifest.table6-stats.npz"
KINETICS_DATA = "--set data.train_manifest=kinetics/train.csv --set data.test_manifest=kinetics/val.csv"

# README command (as extracted) -> how it runs here. Keys are the README's text exactly.
COMMANDS: Dict[str, Run] = {
    # Training
    "avidfast prepare raw/manifest.csv prep/ --extract-audio wav --transcode h264":
        Run(append=QUIET_DATA, creates=("prep/manifest.csv", "prep/rejected.csv")),
    "avidfast stats prep/manifest.csv --audio-preset table6":
        Run(append=QUIET_DATA, creates=("prep/manifest.table6-stats.npz",)),
    "avidfast train avid_s6_kinetics --set data.manifest=prep/manifest.csv "
    "--set data.audio.stats=prep/manifest.table6-stats.npz":
        Run(append=sets(*TINY_TRAIN), creates=(CKPT, "runs/avid-s6-kinetics/checkpoints/epoch_0001.pt")),
    "torchrun --nproc-per-node 8 -m avidfast.cli train avid_s6_kinetics --set ...":
        Run(skip="torchrun with 8 processes (GPUs); tests/test_train.py runs two CPU processes under torchrun's "
                 "environment"),
    "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500 --max-restarts 2 "
    "-m avidfast.cli train avid_s6_kinetics --set ... --resume auto":
        Run(skip="several nodes; tests/test_multinode.py runs two torchrun agents on one machine, and "
                 "tests/test_launch_recipes.py parses this line"),
    "avidfast train cma_s6_kinetics --set data.manifest=... "
    "--set loss.init_from=runs/avid-s6-kinetics/checkpoints/epoch_0200.pt":
        Run(replace={"data.manifest=...": "data.manifest=prep/manifest.csv", "epoch_0200.pt": "epoch_0001.pt"},
            append=sets(*TINY_CMA), creates=("runs/cma-s6-kinetics/checkpoints/last.pt",)),
    "avidfast train avid_s6_kinetics --set ... --resume":  # continues the 1-epoch run for a second epoch
        Run(replace={"--set ...": TRAIN_DATA}, append=sets(*TINY_TRAIN, "optim.epochs=2"),
            creates=("runs/avid-s6-kinetics/checkpoints/epoch_0002.pt",)),
    # Evaluation
    "avidfast manifest ucf101 ucfTrainTestlist ucf/train1.csv --fold 1 --split train": Run(creates=("ucf/train1.csv",)),
    "avidfast manifest ucf101 ucfTrainTestlist ucf/test1.csv --fold 1 --split test": Run(creates=("ucf/test1.csv",)),
    "avidfast eval linear kinetics-linear --checkpoint runs/avid-s6-kinetics/checkpoints/epoch_0200.pt "
    "--set data.train_manifest=kinetics/train.csv --set data.test_manifest=kinetics/val.csv":
        Run(replace={"epoch_0200.pt": "epoch_0001.pt"}, append=sets(*TINY_EVAL),
            creates=("runs/eval/kinetics-linear/results.json",)),
    "avidfast eval memory --checkpoint runs/avid-s6-kinetics/checkpoints/last.pt":
        Run(append=["--repeats", "2", "--epochs", "5"], creates=("runs/eval/memory/results.json",)),
    "avidfast eval finetune ucf101-8x224 --checkpoint CKPT --set data.root=UCF-101 "
    "--set data.train_manifest=ucf/train1.csv --set data.test_manifest=ucf/test1.csv":
        Run(replace={"CKPT": CKPT}, append=sets(*TINY_EVAL),
            creates=("runs/eval/ucf101-8x224/results.json", "runs/eval/ucf101-8x224/finetuned.pt")),
    "avidfast eval retrieval --checkpoint CKPT --manifest held_out.csv --train-manifest train.csv":
        Run(replace={"CKPT": CKPT}, append=["--workers", "0", "--batch", "4", "--knn-k", "3", "--no-progress"],
            creates=("runs/eval/retrieval/results.json",)),
    "avidfast eval linear kinetics-linear --checkpoint CKPT --random-init --set ...":  # beside the trained run's
        Run(replace={"CKPT": CKPT, "--set ...": KINETICS_DATA}, append=sets(*TINY_EVAL),
            creates=("runs/eval/kinetics-linear-random/results.json",)),
    # Using the paper's checkpoints (files in their layout, written by the set-up)
    "avidfast eval linear kinetics-linear --checkpoint AVID-CMA_Kinetics_InstX-N1024-PosW-N64-Top32_checkpoint.pth.tar "
    "--set data.train_manifest=kinetics/train.csv --set data.test_manifest=kinetics/val.csv":
        Run(append=sets(*TINY_EVAL, "name=kinetics-linear-reference"),  # the trained run's folder is taken
            creates=("runs/eval/kinetics-linear-reference/results.json",)),
    "avidfast stats prep/manifest.csv --audio-preset reference":
        Run(append=QUIET_DATA, creates=("prep/manifest.reference-stats.npz",)),
    "avidfast train cma_s6_kinetics --init-from-reference AVID_Kinetics_Cross-N1024_checkpoint.pth.tar "
    "--set data.manifest=prep/manifest.csv --set data.pipeline=cpu --set data.audio.preset=reference "
    "--set data.audio.stats=prep/manifest.reference-stats.npz":
        Run(append=sets(*TINY_CMA, "name=cma-from-reference"),  # runs/cma-s6-kinetics holds the run above
            creates=("runs/cma-from-reference/checkpoints/last.pt",)),
    # Data
    "avidfast prepare raw/ prepared/ --extract-audio wav --transcode h264":
        Run(append=QUIET_DATA, creates=("prepared/manifest.csv",)),
    "avidfast stats prepared/manifest.csv --audio-preset table5":
        Run(append=QUIET_DATA, creates=("prepared/manifest.table5-stats.npz",)),
    "avidfast synthetic demo/ --videos 200 --classes 10":
        Run(append=["--videos", "4", "--classes", "2", "--seconds", "1", "--size", "32x32", "--quiet"],
            creates=("demo/manifest.csv",)),
    # Manifests from published splits
    "avidfast manifest ucf101 ucfTrainTestlist/ ucf_train1.csv --fold 1 --split train": Run(creates=("ucf_train1.csv",)),
    "avidfast manifest hmdb51 testTrainMulti_7030_splits/ hmdb_test1.csv --fold 1 --split test":
        Run(creates=("hmdb_test1.csv",)),
    "avidfast manifest kinetics kinetics400/train.csv k400_train.csv --check-dir k400/videos":
        Run(creates=("k400_train.csv",)),
    "avidfast manifest audioset balanced_train_segments.csv as_bal.csv --class-labels class_labels_indices.csv":
        Run(creates=("as_bal.csv",)),
    "avidfast manifest audioset unbalanced_train_segments.csv as_100k.csv --subset unbalanced_train-100k.txt":
        Run(creates=("as_100k.csv",)),
    "avidfast prepare ucf_train1.csv ucf_prepared/ --root UCF-101/":
        Run(append=QUIET_DATA, creates=("ucf_prepared/manifest.csv",)),
}


def readme_commands(text: str) -> List[str]:
    """The avidfast command lines of the ```sh blocks of ``text``, in order: continuation lines joined,
    comments and repeated spaces removed."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            line = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = " ".join((pending + line).split())
            pending = ""
            words = command.split()
            if words and (words[0] == "avidfast" or (words[0] == "torchrun" and "avidfast.cli" in words)):
                commands.append(command)
    return commands


def test_readme_command_extraction():
    text = ("```sh\navidfast a b \\\n    --c d     # a comment\nmake demo   # not ours\n"
            "torchrun -m avidfast.cli train x\n```\n```python\navidfast.no()\n```\n")
    assert readme_commands(text) == ["avidfast a b --c d", "torchrun -m avidfast.cli train x"]


def test_every_readme_command_is_covered():
    if not README.is_file():
        pytest.skip("no README.md beside the tests (an installed package)")
    found = readme_commands(README.read_text(encoding="utf-8"))
    new = [c for c in found if c not in COMMANDS]
    gone = [c for c in COMMANDS if c not in found]
    assert not new, ("README commands that tests/test_readme_commands.py does not run (add each to COMMANDS, with "
                     "its placeholders and tiny sizes):\n  " + "\n  ".join(new))
    assert not gone, "COMMANDS entries no longer in README.md (remove them):\n  " + "\n  ".join(gone)
    skipped = [c for c in found if COMMANDS[c].skip]
    print(f"{len(found)} README commands: {len(found) - len(skipped)} run, {len(skipped)} skipped")


# ----------------------------------------------------------------------------- the set-up


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _labelled(rows, prefix: str) -> str:
    return "path,label\n" + "".join(f"{prefix}{row['path']},{row['label']}\n" for row in rows)


def _workspace(root: Path) -> None:
    """What the README's commands assume exists, made from one synthetic set (``raw/``)."""
    from avidfast.data.manifest import read_manifest
    from avidfast.data.synthetic import make_dataset
    from test_interop import reference_checkpoint
    from test_splits import AUDIOSET_CLASSES, AUDIOSET_EVAL, HMDB

    manifest = read_manifest(make_dataset(str(root / "raw"), VIDEOS, CLASSES, 2.0, 7, size=(64, 48), workers=1))
    rows = manifest.rows
    clip = [Path(manifest.path(i)) for i in range(len(rows))]
    # labelled manifests the evaluation commands name
    _write(root / "kinetics" / "train.csv", _labelled(rows, "../raw/"))
    _write(root / "kinetics" / "val.csv", _labelled(rows, "../raw/"))
    _write(root / "train.csv", _labelled(rows, "raw/"))
    _write(root / "held_out.csv", _labelled(rows, "raw/"))
    # UCF-101: split lists and videos (the synthetic clips under UCF's names; FFmpeg reads them by content)
    names = [f"Class{chr(ord('A') + c)}" for c in range(CLASSES)]
    train_lines, test_lines = [], []
    for i, row in enumerate(rows):
        label = int(row["label"])
        test = i % 4 == 0  # 2 test videos, 6 training ones
        video = f"{names[label]}/v_{names[label]}_g{(1 if test else 8) + i:02d}_c01.avi"
        _copy(clip[i], root / "UCF-101" / video)
        if test:
            test_lines.append(video)
        else:
            train_lines.append(f"{video} {label + 1}")
    lists = root / "ucfTrainTestlist"
    _write(lists / "classInd.txt", "".join(f"{c + 1} {name}\r\n" for c, name in enumerate(names)))
    _write(lists / "trainlist01.txt", "\r\n".join(train_lines) + "\r\n")
    _write(lists / "testlist01.txt", "\r\n".join(test_lines) + "\r\n")
    # HMDB-51, Kinetics and AudioSet annotation files (tests/test_splits.py's samples)
    for action, lines in HMDB.items():
        _write(root / "testTrainMulti_7030_splits" / f"{action}_test_split1.txt", "\n".join(lines) + "\n")
    _write(root / "kinetics400" / "train.csv", "label,youtube_id,time_start,time_end,split\n"
                                               "abseiling,---QUuC4vJs,3,13,train\nair drumming,--nQbRBEz2s,104,114,train\n")
    _copy(clip[0], root / "k400" / "videos" / "abseiling" / "---QUuC4vJs_000003_000013.mp4")
    _write(root / "balanced_train_segments.csv", AUDIOSET_EVAL)
    _write(root / "class_labels_indices.csv", AUDIOSET_CLASSES)
    _write(root / "unbalanced_train_segments.csv", AUDIOSET_EVAL)
    _write(root / "unbalanced_train-100k.txt", "-0BIyqJj9ZU_30000_40000.mp4\n--4gqARaEJE_0_10000.mp4\n")
    # the paper's checkpoints, in the reference implementation's layout, Table 6 networks at width 4
    _, state = reference_checkpoint(width=4, num_items=VIDEOS, partitions=(0.0123,), positives=2)
    torch.save(state, root / "AVID_Kinetics_Cross-N1024_checkpoint.pth.tar")
    _, state = reference_checkpoint(width=4, num_items=VIDEOS)
    torch.save(state, root / "AVID-CMA_Kinetics_InstX-N1024-PosW-N64-Top32_checkpoint.pth.tar")


def _argv(command: str, run: Run) -> List[str]:
    for old, new in run.replace.items():
        assert old in command, f"{old!r} is not in the README command {command!r}"
        command = command.replace(old, new)
    words = shlex.split(command)
    assert words[0] == "avidfast"
    return [sys.executable, "-m", "avidfast.cli", *words[1:], *run.append]


def test_readme_commands_run(tmp_path):
    if not README.is_file():
        pytest.skip("no README.md beside the tests (an installed package)")
    commands = readme_commands(README.read_text(encoding="utf-8"))
    missing = [c for c in commands if c not in COMMANDS]
    assert not missing, f"not covered (see test_every_readme_command_is_covered): {missing}"
    _workspace(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p))
    ran, skipped, seconds = 0, [], {}
    for command in commands:
        run = COMMANDS[command]
        if run.skip:
            skipped.append(f"{command}: {run.skip}")
            continue
        argv = _argv(command, run)
        if command.startswith("avidfast train avid_s6_kinetics") or "loss.init_from=" in command:
            argv += cpu_pipeline()  # the README: "CPU: --set data.pipeline=cpu"
        started = time.monotonic()
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        seconds[command] = time.monotonic() - started
        assert done.returncode == 0, (f"README command failed (exit {done.returncode}): {command}\n"
                                      f"ran: {' '.join(argv[1:])}\n{done.stderr[-3000:]}")
        for path in run.creates:
            assert (tmp_path / path).is_file(), f"{command}: wrote no {path}\n{done.stderr[-2000:]}"
        ran += 1
    # the baseline did not replace the trained network's results
    trained = json.loads((tmp_path / "runs/eval/kinetics-linear/results.json").read_text())
    baseline = json.loads((tmp_path / "runs/eval/kinetics-linear-random/results.json").read_text())
    assert not trained["checkpoint"].get("random_init") and baseline["checkpoint"].get("random_init")
    print(f"{ran} README commands ran, {len(skipped)} skipped:\n  " + "\n  ".join(skipped))
    print("slowest:\n  " + "\n  ".join(f"{t:5.1f} s  {c}" for c, t in sorted(seconds.items(), key=lambda x: -x[1])[:5]))
    assert ran + len(skipped) == len(commands) and len(skipped) <= 2
