"""Issue 14 (items 3, 7, 8, 9, 10), through the real command line: every mistake ends in one line
(exit 2, stderr's last line ``avidfast: error: ...``, no traceback) and writes or replaces nothing;
no command writes over another run's results; manifests with a byte-order mark or CRLF line ends
read everywhere; prepare refuses what it cannot do well; Ctrl-C exits 130.

Each command runs in a subprocess (``python -m avidfast.cli``) on one tiny synthetic set and one
tiny trained checkpoint, made once for the module.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=4", "data.video.frames=4", "data.video.crop=32", "data.workers=0", "optim.batch_size=4",
        "loss.num_negatives=4", "optim.epochs=1", "train.progress=false", "train.log_every=1",
        "train.channels_last=false", "train.precision=fp32"]
TINY_EVAL = ["data.workers=0", "data.video.frames=4", "data.video.crop=32", "data.clips_per_video=1",
             "optim.epochs=1", "optim.batch_size=4", "run.progress=false", "run.device=cpu", "data.audio.stats=null"]


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


def cli(*args, cwd=None, timeout=300):
    """Runs ``avidfast ARGS`` in a subprocess; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p))
    return subprocess.run([sys.executable, "-m", "avidfast.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def refused(done, *expected):
    """Asserts a one-line refusal (exit 2, last stderr line `avidfast: error: ...`, no traceback) that
    mentions every ``expected`` text; returns the message."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines and lines[-1].startswith("avidfast: error: "), done.stderr[-3000:]
    for text in expected:
        assert text in lines[-1], f"{text!r} not in: {lines[-1]}"
    return lines[-1]


def snapshot(folder):
    """{relative path: sha1} of every file under ``folder`` ({} when it does not exist)."""
    out = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic set (8 labelled clips, 2 s) and a 1-epoch run on it (width 4)."""
    from avidfast.config import load_config
    from avidfast.data.synthetic import make_dataset
    from avidfast.train.loop import train

    root = tmp_path_factory.mktemp("tiny")
    manifest = make_dataset(str(root / "set"), 8, 2, 2.0, 11, size=(64, 48), workers=1)
    run = root / "run"
    train(load_config("demo", TINY + [f"data.manifest={manifest}", f"out_dir={run}"]))
    return {"root": root, "manifest": manifest, "run": run, "checkpoint": run / "checkpoints" / "last.pt"}


# ----------------------------------------------------------------------------- item 3: run folders


def test_random_init_gets_its_own_folder_and_no_run_is_overwritten(tiny, tmp_path):
    linear = ["eval", "linear", "demo-linear", "--checkpoint", tiny["checkpoint"],
              *sets(*TINY_EVAL, f"data.train_manifest={tiny['manifest']}")]
    assert cli(*linear, cwd=tmp_path).returncode == 0
    assert cli(*linear, "--random-init", cwd=tmp_path).returncode == 0
    trained, baseline = tmp_path / "runs/eval/demo-linear", tmp_path / "runs/eval/demo-linear-random"
    assert not json.loads((trained / "results.json").read_text())["checkpoint"].get("random_init")
    assert json.loads((baseline / "results.json").read_text())["checkpoint"]["random_init"]
    assert len(os.listdir(trained / "tb")) == len(os.listdir(baseline / "tb")) == 1  # one run per tb/
    before = snapshot(trained)
    refused(cli(*linear, cwd=tmp_path), str(trained.relative_to(tmp_path)), "already holds an evaluation",
            "--overwrite")
    assert snapshot(trained) == before
    # the other protocols: -random folders, refusal, --overwrite replaces (tb/ included)
    memory = ["eval", "memory", "--checkpoint", tiny["checkpoint"], "--repeats", "1", "--epochs", "1"]
    assert cli(*memory, cwd=tmp_path).returncode == 0
    assert cli(*memory, "--random-init", cwd=tmp_path).returncode == 0
    assert (tmp_path / "runs/eval/memory/results.json").is_file()
    assert (tmp_path / "runs/eval/memory-random/results.json").is_file()
    before = snapshot(tmp_path / "runs/eval/memory")
    refused(cli(*memory, cwd=tmp_path), "already holds an evaluation", "--name or --out")
    assert snapshot(tmp_path / "runs/eval/memory") == before
    assert cli(*memory, "--overwrite", "--seed", "1", cwd=tmp_path).returncode == 0
    assert "seed: 1" in (tmp_path / "runs/eval/memory/config.yaml").read_text()
    assert len(os.listdir(tmp_path / "runs/eval/memory/tb")) == 1


def test_default_run_folders_of_every_protocol():
    from avidfast.eval.memory_protocol import MemoryProbeSettings
    from avidfast.eval.run import default_run_dir

    assert default_run_dir("kinetics-linear") == os.path.join("runs", "eval", "kinetics-linear")
    assert default_run_dir("kinetics-linear", random_init=True) == os.path.join("runs", "eval", "kinetics-linear-random")
    assert MemoryProbeSettings("c.pt", random_init=True).run_dir == os.path.join("runs", "eval", "memory-random")
    assert MemoryProbeSettings("c.pt", random_init=True, out="x").run_dir == "x"


def test_train_refuses_a_folder_holding_a_run(tiny):
    before = snapshot(tiny["run"])
    refused(cli("train", "demo", *sets(*TINY, f"data.manifest={tiny['manifest']}", f"out_dir={tiny['run']}")),
            "already holds a run", "--resume")
    assert snapshot(tiny["run"]) == before


def test_train_replaces_the_logs_of_a_start_that_wrote_no_checkpoint(tiny, tmp_path):
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.old").write_text("x")
    (run / "metrics.csv").write_text("step,epoch,loss,lr,clips_per_s\n1,1,9.0,0.1,1.0\n")
    done = cli("train", "demo", *sets(*TINY, f"data.manifest={tiny['manifest']}", f"out_dir={run}"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replaced metrics.csv, tb/" in done.stderr
    assert "9.0" not in (run / "metrics.csv").read_text() and "events.out.tfevents.old" not in os.listdir(run / "tb")
    (run / "checkpoints" / "last.pt").unlink()  # epoch_0001.pt stays: a new run would write over it
    refused(cli("train", "demo", *sets(*TINY, f"data.manifest={tiny['manifest']}", f"out_dir={run}")),
            "checkpoints/", "another --set out_dir")


# ----------------------------------------------------------------------------- item 7: BOM and CRLF


def test_bom_and_crlf_manifests_read_everywhere(tiny, tmp_path):
    from avidfast.data.manifest import read_manifest

    text = Path(tiny["manifest"]).read_text()
    folder = Path(tiny["manifest"]).parent
    bom = folder / "bom_crlf.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    plain = read_manifest(tiny["manifest"])
    read = read_manifest(str(bom))
    assert read.columns == plain.columns == ["path", "label"] and read.rows == plain.rows
    done = cli("prepare", bom, tmp_path / "prep", "--workers", "0", "--quiet", "--min-seconds", "1")
    assert done.returncode == 0, done.stderr
    assert read_manifest(str(tmp_path / "prep" / "manifest.csv")).columns[:2] == ["path", "label"]
    done = cli("stats", bom, "--workers", "0", "--quiet", "--out", tmp_path / "s.npz")
    assert done.returncode == 0, done.stderr
    done = cli("train", "demo", *sets(*TINY, f"data.manifest={bom}", f"out_dir={tmp_path / 'run'}"))
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_manifest_that_is_not_utf8_text_is_one_line(tmp_path):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("path,label\nvidéo.mp4,0\n".encode("latin-1"))
    refused(cli("stats", bad, "--quiet"), "not UTF-8")


# ----------------------------------------------------------------------------- item 8: prepare


def test_prepare_that_keeps_nothing_fails_with_the_reasons(tiny, tmp_path):
    out = tmp_path / "none"
    refused(cli("prepare", tiny["manifest"], out, "--root", "/nonexistent", "--quiet"), "none of its 8 files exists",
            "--root")
    assert not out.exists()
    refused(cli("prepare", tiny["manifest"], out, "--min-seconds", "100", "--workers", "0", "--quiet"),
            "no usable clip", "8 shorter than 100 s")
    assert not (out / "manifest.csv").exists() and not (out / "rejected.csv").exists()


def test_prepare_refuses_a_folder_prepared_from_another_source(tiny, tmp_path):
    out = tmp_path / "prep"
    assert cli("prepare", tiny["manifest"], out, "--workers", "0", "--quiet", "--min-seconds", "1").returncode == 0
    other = Path(tiny["manifest"]).parent / "first4.csv"
    other.write_text("".join(Path(tiny["manifest"]).read_text().splitlines(keepends=True)[:5]))
    before = snapshot(out)
    refused(cli("prepare", other, out, "--workers", "0", "--quiet", "--min-seconds", "1"),
            "holds the preparation of another source", str(tiny["manifest"]))
    assert snapshot(out) == before
    # the same source again is a rerun (resumes)
    assert cli("prepare", tiny["manifest"], out, "--workers", "0", "--quiet", "--min-seconds", "1").returncode == 0


def test_prepare_leaves_out_earlier_outputs_inside_the_source_folder(tiny, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(Path(tiny["manifest"]).parent / "videos", src / "videos")
    for out in ("first", "second"):
        done = cli("prepare", src, src / out, "--workers", "0", "--quiet", "--min-seconds", "1", "--transcode", "h264")
        assert done.returncode == 0, done.stderr
        assert "found 8 files: kept 8, rejected 0" in done.stdout, done.stdout
    assert "left out first/" in done.stderr


def test_prepare_warns_about_repeated_rows(tiny, tmp_path):
    lines = Path(tiny["manifest"]).read_text().splitlines()
    dups = Path(tiny["manifest"]).parent / "dups.csv"
    dups.write_text("\n".join(lines + lines[1:2]) + "\n")
    done = cli("prepare", dups, tmp_path / "prep", "--workers", "0", "--quiet", "--min-seconds", "1")
    assert done.returncode == 0, done.stderr
    assert "avidfast: warning: 1 row(s)" in done.stderr and "line 10 = line 2" in done.stderr
    assert "found 9 files: kept 9, rejected 0" in done.stdout


# ----------------------------------------------------------------------------- item 9: one line, nothing written


@pytest.mark.parametrize("value, expected", [
    ("optim.lr=-1", "optim.lr must be a positive number"),
    ("optim.lr=.nan", "optim.lr"),
    ("loss.temperature=0", "loss.temperature must be a positive number"),
    ("loss.momentum=1.5", "loss.momentum must be in [0, 1]"),
    ("data.video.fps=0", "data.video.fps must be a positive number"),
    ("data.video.min_area=1.5", "data.video.min_area must be in (0, 1]"),
    ("optim.samples_per_epoch=-5", "optim.samples_per_epoch must be positive"),
    ("data.audio.duration=[3,1]", "data.audio.duration must be [shortest, longest]"),
    ("data.audio.preset=table6", "model.preset=table5 is built for 129"),
])
def test_bad_config_values_are_one_line_and_write_nothing(tiny, tmp_path, value, expected):
    run = tmp_path / "run"
    refused(cli("train", "demo", *sets(*TINY, f"data.manifest={tiny['manifest']}", f"out_dir={run}", value)), expected)
    assert not run.exists()


def test_architecture_mismatch_on_resume_and_init_from(tiny, tmp_path):
    before = snapshot(tiny["run"])
    message = refused(cli("train", "demo", "--resume", *sets(*TINY, f"data.manifest={tiny['manifest']}",
                                                            f"out_dir={tiny['run']}", "model.width=8")),
                      f"--resume {tiny['checkpoint']}", "differ in shape", "(4, 3, 3, 7, 7) in the file",
                      "(8, 3, 3, 7, 7) here", "--set model.width=4")
    assert len(message) < 1000
    assert snapshot(tiny["run"]) == before  # config.yaml and meta.json not rewritten
    run = tmp_path / "cma"
    refused(cli("train", "demo", *sets(*TINY, f"data.manifest={tiny['manifest']}", f"out_dir={run}", "loss.kind=cma",
                                       f"loss.init_from={tiny['checkpoint']}", "model.width=8", "loss.num_positives=1",
                                       "loss.num_negatives_within=2")),
            f"loss.init_from {tiny['checkpoint']}", "differ in shape", "--set model.width=4")
    assert not run.exists()


def test_statistics_output_folders_and_damaged_checkpoints(tiny, tmp_path):
    from avidfast.data.audio import SpectrogramStats

    train = ["train", "demo", *sets(*TINY, f"data.manifest={tiny['manifest']}")]
    run = tmp_path / "run"
    refused(cli(*train, *sets(f"out_dir={run}", "data.audio.stats=nope.npz")), "nope.npz")
    stats6 = tmp_path / "t6.npz"
    SpectrogramStats("table6", torch.zeros(257), torch.ones(257), 1).save(str(stats6))
    refused(cli(*train, *sets(f"out_dir={run}", f"data.audio.stats={stats6}")), "are for preset 'table6'")
    assert not run.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(cli(*train, *sets(f"out_dir={a_file}")), "exists and is not a folder")
    refused(cli(*train, *sets("out_dir=/proc/avidfast-test/run")), "cannot write in /proc")
    refused(cli("stats", tiny["manifest"], "--out", tmp_path, "--quiet"), "is a folder; give a file name")
    assert a_file.read_text() == "x" and not list(tmp_path.glob("*.tmp"))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(tiny["checkpoint"].read_bytes()[:5000])
    message = refused(cli("eval", "memory", "--checkpoint", damaged, "--out", tmp_path / "m"), "damaged or incomplete")
    assert "--trust" not in message and not (tmp_path / "m").exists()
    refused(cli("eval", "memory", "--checkpoint", tiny["checkpoint"], "--train-fraction", "1.5",
                "--out", tmp_path / "m"), "--train-fraction 1.5")
    assert not (tmp_path / "m").exists()


def test_too_many_bad_samples_is_one_line(tiny, tmp_path):
    folder = Path(tiny["manifest"]).parent
    (folder / "zero.mp4").write_bytes(b"")
    with_bad = folder / "with_bad.csv"
    with_bad.write_text(Path(tiny["manifest"]).read_text() + "zero.mp4,0\n")
    for workers in ("0", "1"):
        refused(cli("train", "demo", *sets(*TINY, f"data.manifest={with_bad}", "data.max_bad_fraction=0",
                                           f"data.workers={workers}", f"out_dir={tmp_path / workers}")),
                "bad samples", "max_bad_fraction")


# ----------------------------------------------------------------------------- item 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible CUDA device")
def test_eval_memory_device_error_names_its_own_option(tiny, tmp_path):
    message = refused(cli("eval", "memory", "--checkpoint", tiny["checkpoint"], "--device", "cuda",
                          "--out", tmp_path / "m"), "--device cuda", "use --device cpu")
    assert "--set" not in message


def test_retrieval_takes_the_reference_audio_preset():
    from avidfast.cli import build_parser

    args = build_parser().parse_args(["eval", "retrieval", "--checkpoint", "c.pt", "--manifest", "m.csv",
                                      "--audio-preset", "reference"])
    assert args.audio_preset == "reference"


def test_the_last_epoch_is_kept_and_the_readme_says_so(tiny):
    assert (tiny["run"] / "checkpoints" / "epoch_0001.pt").is_file()  # train.keep_epochs=[] in the demo config
    readme = (ROOT / "README.md").read_text() if (ROOT / "README.md").is_file() else None
    if readme is not None:
        assert "`epoch_NNNN.pt` at `train.keep_epochs` and after the last\nepoch" in readme


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_exit_codes(tiny, tmp_path, sig, code):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p))
    process = subprocess.Popen([sys.executable, "-m", "avidfast.cli", "train", "demo",
                                *sets(*TINY, f"data.manifest={tiny['manifest']}", f"out_dir={run}", "optim.epochs=100")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == code, output[-2000:]
    assert (run / "checkpoints" / "last.pt").is_file() and "resume with --resume" in output
