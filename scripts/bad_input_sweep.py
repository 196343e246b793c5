"""Bad inputs against the command line and the Python API: does every one end in one line?

Each case feeds avidfast one mistake (a bad value in ``--set``, a missing or damaged file, a folder
that already holds another run, an impossible option, ...). A case ends in one of:

* ``refused``: the command exits 2 and its last line on stderr is ``avidfast: error: ...`` (or
  argparse's usage error), with no traceback; an API call raises an ``AvidfastError``;
* ``warned``: (cases marked so) it runs, and stderr holds the warning the case expects;
* ``traceback``: anything else escaped (a bug: the user sees a traceback);
* ``accepted``: the mistake went through silently (exit 0 / no exception).

Usage: ``python scripts/bad_input_sweep.py [WORKDIR]``, with the avidfast to test importable
(e.g. ``PYTHONPATH=/path/to/checkout``). Prints one line per case and the counts; exits 1 when a
case ends in a traceback or is accepted. tests/test_bad_inputs.py runs it. The commands run in
this process (``avidfast.cli.main(argv)``, stdout and stderr captured), in ``WORKDIR`` (a fresh
temporary folder by default), on one tiny synthetic set made once. The case list is written for
the current code but runs against older checkouts too, to count what they get wrong.
"""
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

# Tiny training settings: a step takes well under a second on a CPU.
TINY = ["model.width=4", "data.video.frames=4", "data.video.crop=32", "data.workers=0", "optim.batch_size=4",
        "loss.num_negatives=4", "optim.epochs=1", "train.progress=false", "train.log_every=1",
        "train.channels_last=false", "train.precision=fp32"]
TINY_EVAL = ["data.workers=0", "data.video.frames=4", "data.video.crop=32", "data.clips_per_video=1",
             "optim.epochs=1", "optim.batch_size=4", "run.progress=false", "run.device=cpu", "data.audio.stats=null"]


def sets(*items: str) -> List[str]:
    return [arg for item in items for arg in ("--set", item)]


@dataclass
class Case:
    name: str
    argv: Optional[Sequence[str]] = None  # a command line (without "avidfast")
    call: Optional[Callable[[], object]] = None  # or an API call
    warns: Optional[str] = None  # accepted with this warning on stderr (instead of refused)


@dataclass
class Outcome:
    case: str
    kind: str  # refused | warned | traceback | accepted
    detail: str = ""


@dataclass
class Fixtures:
    """The files the cases point at, made once in ``root``."""

    root: str
    manifest: str = ""  # 8 labelled clips
    run: str = ""  # a finished tiny training run
    checkpoint: str = ""
    damaged: str = ""  # checkpoint cut in half
    empty: str = ""  # header-only manifest
    bad_rows: str = ""  # the 8 clips and a zero-byte one
    stats6: str = ""  # table6 statistics (the tiny config is table5)
    prepared: str = ""  # `prepare` of the set (probe only)
    sub_manifest: str = ""  # 4 rows of the set: another source
    eval_done: str = ""  # a finished memory probe's folder
    extra: Dict[str, str] = field(default_factory=dict)


def _write(path: str, text: str, encoding: str = "utf-8") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return path


def make_fixtures(root: str) -> Fixtures:
    from avidfast.cli import main
    from avidfast.data.synthetic import make_dataset

    fx = Fixtures(root)
    fx.manifest = make_dataset(os.path.join(root, "set"), 8, 2, 2.0, 5, size=(64, 48), workers=1)
    set_dir = os.path.dirname(fx.manifest)
    with open(fx.manifest) as f:
        lines = f.read().splitlines()
    fx.empty = _write(os.path.join(root, "empty.csv"), lines[0] + "\n")
    fx.sub_manifest = _write(os.path.join(set_dir, "sub.csv"), "\n".join(lines[:5]) + "\n")
    _write(os.path.join(set_dir, "zero.mp4"), "")
    fx.bad_rows = _write(os.path.join(set_dir, "with_bad.csv"), "\n".join(lines + ["zero.mp4,0"]) + "\n")
    fx.run = os.path.join(root, "runs", "tiny")
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        code = main(["train", "demo", *sets(*TINY, f"data.manifest={fx.manifest}", f"out_dir={fx.run}")])
        assert code == 0, quiet.getvalue()[-3000:]
        fx.checkpoint = os.path.join(fx.run, "checkpoints", "last.pt")
        fx.stats6 = os.path.join(root, "table6-stats.npz")
        code = main(["stats", fx.manifest, "--audio-preset", "table6", "--workers", "0", "--quiet", "--out", fx.stats6])
        assert code == 0, quiet.getvalue()[-3000:]
        fx.prepared = os.path.join(root, "prepared")
        code = main(["prepare", fx.manifest, fx.prepared, "--workers", "0", "--quiet", "--min-seconds", "1"])
        assert code == 0, quiet.getvalue()[-3000:]
        fx.eval_done = os.path.join(root, "runs", "eval", "memory-done")
        code = main(["eval", "memory", "--checkpoint", fx.checkpoint, "--out", fx.eval_done, "--repeats", "1",
                     "--epochs", "1", "--device", "cpu"])
        assert code == 0, quiet.getvalue()[-3000:]
    with open(fx.checkpoint, "rb") as f:
        data = f.read()
    fx.damaged = os.path.join(root, "damaged.pt")
    with open(fx.damaged, "wb") as f:
        f.write(data[: len(data) // 2])
    fx.extra["file"] = _write(os.path.join(root, "a_file.txt"), "not a folder\n")
    fx.extra["inside_src"] = os.path.join(set_dir, "prep_inside")
    return fx


def cases(fx: Fixtures) -> List[Case]:
    """The bad inputs, each a Case."""
    train = ["train", "demo", *sets(*TINY, f"data.manifest={fx.manifest}")]
    never = os.path.join(fx.root, "runs", "never")  # no case may leave anything here
    count = iter(range(1000))

    def fresh():  # the training command line with a new out_dir under runs/never/
        return [*train, "--set", f"out_dir={never}/{next(count)}"]

    new_run = f"{never}/unset"
    failed = os.path.join(fx.root, "runs", "failed")  # runs that start, then stop on bad data
    ck = ["--checkpoint", fx.checkpoint]
    memory = ["eval", "memory", *ck, "--repeats", "1", "--epochs", "1", "--out", os.path.join(fx.root, "mem-never")]
    linear = ["eval", "linear", "demo-linear", *ck, *sets(*TINY_EVAL, f"data.train_manifest={fx.manifest}",
                                                          f"out_dir={os.path.join(fx.root, 'lin-never')}")]
    retrieval = ["eval", "retrieval", *ck, "--manifest", fx.manifest, "--workers", "0", "--device", "cpu",
                 "--no-progress", "--out", os.path.join(fx.root, "ret-never")]
    out = []

    def cli(name, *argv, warns=None):
        out.append(Case(name, argv=list(argv), warns=warns))

    def api(name, fn):
        out.append(Case(name, call=fn))

    # training configuration: values the types allow but the method does not
    for value in ("optim.lr=-1", "optim.lr=.nan", "optim.lr=.inf", "loss.temperature=0", "loss.temperature=-0.07",
                  "loss.momentum=1.5", "loss.momentum=-0.1", "data.video.fps=0", "data.video.min_area=1.5",
                  "data.video.min_area=0", "optim.samples_per_epoch=-5", "optim.samples_per_epoch=0",
                  "data.audio.duration=[3,1]", "data.audio.duration=[0,1]", "data.audio.volume=[1.1,0.9]",
                  "data.audio.max_offset=-1", "data.video.flip=2", "data.video.brightness=-1", "data.video.hue=0.8",
                  "optim.weight_decay=-1", "optim.gamma=0", "data.max_bad_fraction=2", "optim.epochs=0",
                  "data.workers=-1", "optim.batch_size=abc", "optim.lr=fast", "optim.milestones=3",
                  "loss.mode=crosss", "model.width=0", "data.audio.preset=table6",
                  "train.keep_epochs=[0]", "optim.milestones=[-1]"):
        cli(f"train --set {value}", *fresh(), "--set", value)
    cli("train --set without =", *fresh(), "--set", "optim.lr")
    cli("train --set unknown key", *fresh(), "--set", "optim.learning_rate=1")
    cli("train unknown config", "train", "no_such_config")
    cli("train manifest missing", *fresh(), "--set", "data.manifest=nope.csv")
    cli("train manifest is a folder", *fresh(), "--set", f"data.manifest={fx.root}")
    cli("train manifest header only", *fresh(), "--set", f"data.manifest={fx.empty}")
    cli("train manifest unset", "train", "demo", *sets(*TINY, f"out_dir={new_run}"))
    cli("train num_negatives > rows", *fresh(), "--set", "loss.num_negatives=100")
    cli("train stats missing", *fresh(), "--set", "data.audio.stats=nope.npz")
    cli("train stats of another preset", *fresh(), "--set", f"data.audio.stats={fx.stats6}")
    cli("train out_dir is a file", *train, "--set", f"out_dir={fx.extra['file']}")
    cli("train out_dir below a file", *train, "--set", f"out_dir={fx.extra['file']}/run")
    cli("train out_dir unwritable", *train, "--set", "out_dir=/proc/avidfast-sweep/run")
    cli("train out_dir holds a run", *train, "--set", f"out_dir={fx.run}")
    cli("train --resume of a different architecture", *train, *sets(f"out_dir={fx.run}", "model.width=8"), "--resume")
    cli("train --resume without a checkpoint", *fresh(), "--resume")
    cli("train cma init_from of a different architecture", *fresh(), *sets(
        "loss.kind=cma", f"loss.init_from={fx.checkpoint}", "model.width=8", "loss.num_positives=1",
        "loss.num_negatives_within=2"))
    cli("train cma init_from missing", *fresh(), *sets("loss.kind=cma", "loss.init_from=nope.pt",
                                                     "loss.num_positives=1", "loss.num_negatives_within=2"))
    cli("train cma init_from damaged", *fresh(), *sets("loss.kind=cma", f"loss.init_from={fx.damaged}",
                                                     "loss.num_positives=1", "loss.num_negatives_within=2"))
    cli("train --init-from-reference missing", *fresh(), "--init-from-reference", "nope.pth.tar")
    cli("train --init-from-reference damaged", *fresh(), "--init-from-reference", fx.damaged)
    cli("train shards missing", *fresh(), "--set", "data.shards=nope/")
    cli("train shards of no index", *fresh(), "--set", f"data.shards={fx.root}")
    cli("bench shards without shards", "bench", "shards", fx.manifest)
    cli("prepare --shard-mb 0", "prepare", fx.manifest, os.path.join(fx.root, "prep-never5"), "--shards",
        "--shard-mb", "0")
    cli("train too many bad samples", "train", "demo", *sets(*TINY, f"data.manifest={fx.bad_rows}",
                                                             "data.max_bad_fraction=0", f"out_dir={failed}/bad0"))
    cli("train too many bad samples (workers)", "train", "demo", *sets(
        *TINY, f"data.manifest={fx.bad_rows}", "data.max_bad_fraction=0", "data.workers=1", f"out_dir={failed}/bad1"))
    # prepare
    cli("prepare --root /nonexistent", "prepare", fx.manifest, os.path.join(fx.root, "prep-never"), "--root",
        "/nonexistent", "--workers", "0", "--quiet")
    cli("prepare --min-seconds 100", "prepare", fx.manifest, os.path.join(fx.root, "prep-never2"), "--min-seconds",
        "100", "--workers", "0", "--quiet")
    cli("prepare into a folder prepared from another source", "prepare", fx.sub_manifest, fx.prepared,
        "--workers", "0", "--quiet", "--min-seconds", "1")
    cli("prepare SRC missing", "prepare", "nope/", os.path.join(fx.root, "prep-never3"), "--quiet")
    cli("prepare OUT is a file", "prepare", fx.manifest, fx.extra["file"], "--quiet", "--workers", "0")
    cli("prepare SRC header only", "prepare", fx.empty, os.path.join(fx.root, "prep-never4"), "--quiet")
    cli("prepare --fps 0", "prepare", fx.manifest, os.path.join(fx.root, "prep-never5"), "--fps", "0")
    cli("prepare --workers -1", "prepare", fx.manifest, os.path.join(fx.root, "prep-never6"), "--workers", "-1")
    cli("prepare duplicate source rows", "prepare", fx.extra["dups"], os.path.join(fx.root, "prep-dups"),
        "--workers", "0", "--quiet", "--min-seconds", "1", warns="repeat")
    cli("prepare OUT inside SRC, second run", "prepare", os.path.dirname(fx.manifest), fx.extra["inside_src2"],
        "--workers", "0", "--quiet", "--min-seconds", "1", warns="left out")
    # stats
    cli("stats --out DIR", "stats", fx.manifest, "--out", fx.root, "--workers", "0", "--quiet")
    cli("stats --out below a file", "stats", fx.manifest, "--out", fx.extra["file"] + "/s.npz", "--workers", "0",
        "--quiet")
    cli("stats manifest missing", "stats", "nope.csv", "--quiet")
    cli("stats manifest header only", "stats", fx.empty, "--quiet")
    # synthetic
    cli("synthetic --videos 0", "synthetic", os.path.join(fx.root, "syn-never"), "--videos", "0")
    cli("synthetic --seconds -1", "synthetic", os.path.join(fx.root, "syn-never"), "--seconds", "-1", "--quiet")
    cli("synthetic --seconds 0", "synthetic", os.path.join(fx.root, "syn-never"), "--seconds", "0", "--quiet")
    cli("synthetic --size 65x64", "synthetic", os.path.join(fx.root, "syn-never"), "--size", "65x64", "--quiet",
        "--videos", "2", "--classes", "2")
    cli("synthetic --classes > --videos", "synthetic", os.path.join(fx.root, "syn-never"), "--videos", "2",
        "--classes", "5", "--quiet")
    cli("synthetic OUT is a file", "synthetic", fx.extra["file"], "--videos", "2", "--classes", "2", "--quiet")
    # manifest
    cli("manifest ucf101 missing lists", "manifest", "ucf101", "nope/", os.path.join(fx.root, "m.csv"),
        "--fold", "1", "--split", "train")
    # eval
    cli("eval memory --train-fraction 1.5", *memory, "--train-fraction", "1.5")
    cli("eval memory --train-fraction 0", *memory, "--train-fraction", "0")
    cli("eval memory --lr -1", *memory, "--lr", "-1")
    cli("eval memory --weight-decay -1", *memory, "--weight-decay", "-1")
    cli("eval memory --device tpu", *memory, "--device", "tpu")
    cli("eval memory --device cuda:7", *memory, "--device", "cuda:7")
    cli("eval memory checkpoint missing", "eval", "memory", "--checkpoint", "nope.pt")
    cli("eval memory checkpoint damaged", "eval", "memory", "--checkpoint", fx.damaged)
    cli("eval memory checkpoint is a folder", "eval", "memory", "--checkpoint", fx.root)
    cli("eval memory labels of another size", *memory, "--labels", fx.sub_manifest)
    cli("eval memory into a finished run", "eval", "memory", *ck, "--out", fx.eval_done, "--repeats", "1",
        "--epochs", "1")
    cli("eval linear train manifest missing", *linear, "--set", "data.train_manifest=nope.csv")
    cli("eval linear train manifest header only", *linear, "--set", f"data.train_manifest={fx.empty}")
    cli("eval linear --set run.device=cuda:7", *linear, "--set", "run.device=cuda:7")
    cli("eval linear --set optim.lr=-1", *linear, "--set", "optim.lr=-1")
    cli("eval linear --set optim.lr=.nan", *linear, "--set", "optim.lr=.nan")
    cli("eval linear --set data.video.fps=0", *linear, "--set", "data.video.fps=0")
    cli("eval linear --set linear.blocks=[nope]", *linear, "--set", "linear.blocks=[nope]")
    cli("eval linear --set optim.weight_decay=-1", *linear, "--set", "optim.weight_decay=-1")
    cli("eval linear --set optim.gamma=0", *linear, "--set", "optim.gamma=0")
    cli("eval linear finetune config", "eval", "linear", "demo-finetune", *ck,
        *sets(f"data.train_manifest={fx.manifest}"))
    cli("eval linear into a finished run", *linear, "--set", f"out_dir={fx.eval_done}")
    cli("eval finetune --set finetune.dropout=1.5", "eval", "finetune", "demo-finetune", *ck,
        *sets(*TINY_EVAL, f"data.train_manifest={fx.manifest}", "finetune.dropout=1.5"))
    cli("eval retrieval --audio-stats missing", *retrieval, "--audio-stats", "nope.npz")
    cli("eval retrieval --audio-stats of another preset", *retrieval, "--audio-stats", fx.stats6)
    cli("eval retrieval --manifest header only", "eval", "retrieval", *ck, "--manifest", fx.empty)
    cli("eval retrieval --k 0", *retrieval, "--k", "0")
    cli("eval retrieval --train-manifest unlabelled", *retrieval, "--train-manifest", fx.extra["unlabelled"])
    # the Python API: entry points raise AvidfastError subclasses
    api("load_config lr -1", lambda: _load_config(["optim.lr=-1"]))
    api("load_config temperature 0", lambda: _load_config(["loss.temperature=0"]))
    api("load_config duration [3,1]", lambda: _load_config(["data.audio.duration=[3,1]"]))
    api("load_eval_config lr -1", lambda: _load_eval_config(["optim.lr=-1", "data.train_manifest=x.csv"]))
    api("read_manifest missing", lambda: _read_manifest("nope.csv"))
    api("read_manifest not UTF-8", lambda: _read_manifest(fx.extra["latin1"]))
    api("read_manifest binary", lambda: _read_manifest(fx.damaged))
    api("train out_dir is a file", lambda: _train([f"data.manifest={fx.manifest}", f"out_dir={fx.extra['file']}"]))
    api("train resume of a different architecture",
        lambda: _train([f"data.manifest={fx.manifest}", f"out_dir={fx.run}", "model.width=8"], resume=True))
    api("prepare --root /nonexistent", lambda: _prepare(fx.manifest, os.path.join(fx.root, "prep-never7"),
                                                        root="/nonexistent"))
    api("prepare keeps nothing", lambda: _prepare(fx.manifest, os.path.join(fx.root, "prep-never8"),
                                                  min_seconds=100))
    api("load_pretrained damaged", lambda: _load_pretrained(fx.damaged))
    api("run_memory_probe train_fraction 1.5", lambda: _memory(fx.checkpoint, train_fraction=1.5,
                                                                out=os.path.join(fx.root, "mem-never2")))
    api("SpectrogramStats.load another preset", lambda: _stats_load(fx.stats6, "table5"))
    api("make_dataset 0 videos", lambda: _make_dataset(os.path.join(fx.root, "syn-never2"), 0, 2))
    return out


# API calls, imported lazily so that the module loads against any checkout.
def _load_config(overrides):
    from avidfast.config import load_config

    return load_config("demo", TINY + overrides)


def _load_eval_config(overrides):
    from avidfast.eval.config import load_eval_config

    return load_eval_config("demo-linear", overrides)


def _read_manifest(path):
    from avidfast.data.manifest import read_manifest

    return read_manifest(path)


def _train(overrides, resume=False):
    from avidfast.config import load_config
    from avidfast.train.loop import train

    return train(load_config("demo", TINY + overrides), resume=resume)


def _prepare(src, out, **options):
    from avidfast.data.prepare import prepare

    return prepare(src, out, workers=0, progress=False, **options)


def _load_pretrained(path):
    from avidfast.checkpoints.pretrained import load_pretrained

    return load_pretrained(path)


def _memory(checkpoint, **settings):
    from avidfast.eval.memory_protocol import MemoryProbeSettings, run_memory_probe

    return run_memory_probe(MemoryProbeSettings(checkpoint=checkpoint, repeats=1, epochs=1, device="cpu", **settings))


def _stats_load(path, preset):
    from avidfast.data.audio import SpectrogramStats, get_preset

    return SpectrogramStats.load(path, get_preset(preset))


def _make_dataset(out, videos, classes):
    from avidfast.data.synthetic import make_dataset

    return make_dataset(out, videos, classes, 1.0, 0, size=(32, 32), workers=1)


def _more_fixtures(fx: Fixtures) -> None:
    """Fixtures that need no avidfast call."""
    set_dir = os.path.dirname(fx.manifest)
    with open(fx.manifest) as f:
        lines = f.read().splitlines()
    fx.extra["dups"] = _write(os.path.join(set_dir, "dups.csv"), "\n".join(lines + lines[1:3]) + "\n")
    fx.extra["unlabelled"] = _write(os.path.join(set_dir, "unlabelled.csv"),
                                    "\n".join(["path"] + [line.split(",")[0] for line in lines[1:]]) + "\n")
    fx.extra["latin1"] = _write(os.path.join(fx.root, "latin1.csv"), "path,label\nvidéo.mp4,0\n", encoding="latin-1")
    # a folder prepared inside the source folder: a later prepare of the source must not read its outputs
    fx.extra["inside_src2"] = os.path.join(set_dir, "prep_inside2")


def _prepare_inside(fx: Fixtures) -> None:
    from avidfast.cli import main

    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        code = main(["prepare", os.path.dirname(fx.manifest), fx.extra["inside_src"], "--workers", "0", "--quiet",
                     "--min-seconds", "1", "--transcode", "h264"])
    assert code == 0, quiet.getvalue()[-3000:]


def run_case(case: Case) -> Outcome:
    from avidfast.errors import AvidfastError

    stdout, stderr = io.StringIO(), io.StringIO()
    code: object = None
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if case.argv is not None:
                from avidfast.cli import main

                try:
                    code = main(list(case.argv))
                except SystemExit as stop:  # argparse
                    code = stop.code
            else:
                case.call()
                code = 0
    except AvidfastError as error:
        if case.call is not None:
            text = str(error)
            return Outcome(case.name, "refused" if "Traceback" not in text and "\n" not in text else "traceback",
                           f"{type(error).__name__}: {text[:300]}")
        return Outcome(case.name, "traceback", f"escaped main(): {type(error).__name__}: {error}"[:300])
    except Exception as error:  # noqa: BLE001 - what the sweep counts
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return Outcome(case.name, "traceback", last[:300])
    err = stderr.getvalue()
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "Traceback" in err:
        return Outcome(case.name, "traceback", f"exit {code}; 'Traceback' on stderr; last line: {last[:200]}")
    if code == 0:
        if case.warns is not None and case.warns in err:
            return Outcome(case.name, "warned", next(line for line in lines if case.warns in line)[:300])
        return Outcome(case.name, "accepted", f"exit 0{'; no warning ' + repr(case.warns) if case.warns else ''}")
    if code == 2 and (last.startswith("avidfast: error:") or ": error: " in last and last.startswith("avidfast")):
        return Outcome(case.name, "refused", last[:300])
    return Outcome(case.name, "traceback", f"exit {code}; last line: {last[:300]}")


# What the refused cases must not leave behind. A prepare that keeps nothing may leave its probe
# records (OUT/.prepare/, what a rerun resumes from), never a manifest.
NEVER_WRITTEN = ("runs/never", "mem-never", "mem-never2", "lin-never", "ret-never", "prep-never", "prep-never3",
                 "prep-never4", "prep-never5", "prep-never6", "prep-never7", "syn-never", "syn-never2",
                 "prep-never2/manifest.csv", "prep-never2/rejected.csv", "prep-never8/manifest.csv",
                 "prep-never8/rejected.csv")


def sweep(workdir: str, progress: Optional[Callable[[Outcome], None]] = None) -> List[Outcome]:
    """Makes the fixtures in ``workdir``, runs every case there; returns the outcomes."""
    import logging

    previous = os.getcwd()
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    try:
        fx = make_fixtures(os.path.abspath(workdir))
        _more_fixtures(fx)
        _prepare_inside(fx)
        outcomes = []
        for case in cases(fx):
            outcome = run_case(case)
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
        never = [p for p in NEVER_WRITTEN if os.path.exists(os.path.join(workdir, p))]
        outcomes.append(Outcome("nothing written by refused cases", "accepted" if never else "refused",
                                f"written: {', '.join(never)}" if never else ""))
        return outcomes
    finally:
        os.chdir(previous)
        logging.getLogger("avidfast").handlers.clear()


def summary(outcomes: List[Outcome]) -> Dict[str, int]:
    counts = {"refused": 0, "warned": 0, "traceback": 0, "accepted": 0}
    for outcome in outcomes:
        counts[outcome.kind] += 1
    counts["cases"] = len(outcomes)
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    workdir = argv[0] if argv else tempfile.mkdtemp(prefix="avidfast-sweep-")
    import avidfast

    print(f"avidfast from {os.path.dirname(avidfast.__file__)}; work folder {workdir}", flush=True)

    def show(outcome: Outcome) -> None:
        print(f"{outcome.kind:9s}  {outcome.case}: {outcome.detail}", flush=True)

    outcomes = sweep(workdir, show)
    show(outcomes[-1])
    counts = summary(outcomes)
    print(json.dumps(counts))
    if not argv:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if counts["traceback"] or counts["accepted"] else 0


if __name__ == "__main__":
    sys.exit(main())
