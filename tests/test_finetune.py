"""`avidfast eval finetune`: end to end from a checkpoint, determinism, the caller's model, errors; `eval memory`
on the same checkpoint."""
import contextlib
import glob
import io
import json
import os

import pytest
import torch

from avidfast.cli import main
from avidfast.data.synthetic import make_dataset
from avidfast.config import ConfigError
from avidfast.eval.config import load_eval_config
from avidfast.eval.finetune import FinetuneClassifier, run_finetune
from avidfast.checkpoints.pretrained import load_pretrained
from avidfast.eval.run import start_run
from avidfast.config import load_config
from avidfast.train.loop import train

NUM_VIDEOS, NUM_CLASSES, CLIPS = 12, 3, 2
# 12 videos of 3 classes, test_fraction 0.3: one test video per class.
TEST_VIDEOS = 3
SMALL = ["optim.epochs=1", "optim.batch_size=4", "data.workers=0", "data.audio.stats=null", "run.progress=false",
         "run.log_every=1", f"data.clips_per_video={CLIPS}", "run.device=cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(manifest, checkpoint): the synthetic set and one step of Cross-AVID at width 16 on it."""
    root = tmp_path_factory.mktemp("finetune")
    manifest = make_dataset(str(root / "data"), num_videos=NUM_VIDEOS, num_classes=NUM_CLASSES, seconds=2.0, seed=0,
                            size=(80, 64), workers=1)
    cfg = load_config("demo", [f"data.manifest={manifest}", f"out_dir={root / 'train'}", "model.width=16",
                               "optim.epochs=1", "optim.batch_size=4", "loss.num_negatives=4", "data.workers=0",
                               "train.progress=false"])
    train(cfg, max_steps=1)
    return manifest, str(root / "train" / "checkpoints" / "last.pt")


def _cli(manifest, checkpoint, out_dir, *extra):
    args = ["eval", "finetune", "demo-finetune", "--checkpoint", checkpoint, "--set", f"data.train_manifest={manifest}",
            "--set", f"out_dir={out_dir}"]
    for override in SMALL + list(extra):
        args += ["--set", override]
    return main(args)


@pytest.fixture(scope="module")
def cli_run(pretrained, tmp_path_factory):
    """(run folder, printed output) of `avidfast eval finetune demo-finetune` on the synthetic set."""
    manifest, checkpoint = pretrained
    out_dir = tmp_path_factory.mktemp("cli") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _cli(manifest, checkpoint, out_dir) == 0
    return out_dir, printed.getvalue()


def test_cli_runs_end_to_end_from_a_checkpoint(pretrained, cli_run):
    manifest, checkpoint = pretrained
    out_dir, printed = cli_run
    assert "fine-tuning: 3 classes" in printed and "video top-1" in printed
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["protocol"] == "finetune" and saved["checkpoint"]["path"] == checkpoint
    assert saved["num_classes"] == NUM_CLASSES and abs(saved["chance"] - 1 / NUM_CLASSES) < 1e-12
    assert saved["num_test_videos"] == TEST_VIDEOS and saved["num_test"] == TEST_VIDEOS * CLIPS
    assert saved["num_train"] == 2 * 4  # 9 training videos: two full batches of 4 per epoch
    # accuracies are shares of the test clips / videos
    assert saved["clip_top1"] * TEST_VIDEOS * CLIPS == pytest.approx(round(saved["clip_top1"] * TEST_VIDEOS * CLIPS))
    assert saved["video_top1"] * TEST_VIDEOS == pytest.approx(round(saved["video_top1"] * TEST_VIDEOS))
    assert 0 <= saved["clip_top1"] <= 1 and 0 <= saved["video_top1"] <= 1
    assert len(saved["train_loss"]) == len(saved["train_top1"]) == len(saved["lr"]) == 1
    assert saved["train_loss"][0] > 0 and saved["lr"] == [pytest.approx(3e-4)]
    assert saved["settings"]["classes"] == ["0", "1", "2"] and saved["settings"]["dropout"] == 0.5
    assert saved["settings"]["batch_size_per_process"] == saved["settings"]["global_batch_size"] == 4
    meta = json.loads((out_dir / "meta.json").read_text())
    assert meta["batch_size_per_process"] == meta["global_batch_size"] == 4 and meta["world_size"] == 1
    assert glob.glob(str(out_dir / "tb" / "events.out.tfevents.*"))
    weights = torch.load(saved["weights"], map_location="cpu", weights_only=True)
    assert weights["classes"] == ["0", "1", "2"] and weights["model"]["classifier.weight"].shape[0] == NUM_CLASSES
    assert any(k.startswith("encoder.") for k in weights["model"])


@pytest.mark.parametrize("name, total", [("ucf101-8x224", 32), ("hmdb51-32x224", 16), ("kinetics-linear-8x224", 128)])
def test_paper_eval_configs_state_the_global_batch(name, total):
    """Table 4's bs is the batch over all processes (the reference divides it by its GPU count)."""
    cfg = load_eval_config(name, ["data.train_manifest=train.csv"])
    assert cfg.optim.batch_size is None and cfg.optim.global_batch_size == total
    assert [cfg.per_process_batch(w) for w in (1, 2, 4)] == [total, total // 2, total // 4]
    with pytest.raises(ConfigError, match=f"optim.global_batch_size={total} does not divide over 3 processes"):
        cfg.per_process_batch(3)
    with pytest.raises(ConfigError, match="set exactly one of optim.batch_size .* and optim.global_batch_size"):
        load_eval_config(name, ["data.train_manifest=train.csv", "optim.batch_size=8"])
    per_process = load_eval_config(name, ["data.train_manifest=train.csv", "optim.batch_size=8",
                                          "optim.global_batch_size=null"])
    assert per_process.per_process_batch(4) == 8


def _run(cfg, encoder, out_dir):
    run = start_run(str(out_dir), cfg.to_dict(), cfg.run.device, cfg.run.precision, {}, cfg.seed)
    result = run_finetune(cfg, encoder, run)
    run.finish(result.to_dict(), result.format())
    return result


def test_whole_encoder_trains_on_a_copy_deterministically(pretrained, cli_run, tmp_path):
    manifest, checkpoint = pretrained
    encoder = load_pretrained(checkpoint).model.video
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = load_eval_config("demo-finetune", SMALL + [f"data.train_manifest={manifest}"])
    result = _run(cfg, encoder, tmp_path / "again")
    for k, v in encoder.state_dict().items():  # the caller's encoder is untouched
        assert torch.equal(v, before[k]), k
    saved = json.loads((cli_run[0] / "results.json").read_text())  # the same seed and settings as the CLI run
    assert (result.clip_top1, result.video_top1, result.train_loss) == (saved["clip_top1"], saved["video_top1"],
                                                                        saved["train_loss"])
    assert isinstance(result.model, FinetuneClassifier)
    tuned = result.model.encoder.state_dict()
    convs = [k for k, v in before.items() if v.dim() == 5]  # every conv of the encoder, first to last
    assert all(not torch.equal(tuned[k], before[k]) for k in (convs[0], convs[-1]))  # the whole network trains
    bn = [k for k in before if k.endswith("running_mean")]
    assert bn and any(not torch.equal(tuned[k], before[k]) for k in bn)  # BN statistics follow the new data

    frozen_cfg = load_eval_config("demo-finetune", SMALL + [f"data.train_manifest={manifest}",
                                                            "finetune.freeze_bn=true", "data.clips_per_video=1"])
    frozen = _run(frozen_cfg, encoder, tmp_path / "frozen")
    tuned = frozen.model.encoder.state_dict()
    assert all(torch.equal(tuned[k], before[k]) for k in bn)  # kept from pre-training
    assert not torch.equal(tuned[convs[0]], before[convs[0]])


def test_errors_are_one_line_and_name_the_culprit(pretrained, tmp_path, capsys):
    manifest, checkpoint = pretrained
    assert main(["eval", "finetune", "demo-linear", "--checkpoint", checkpoint]) == 2
    assert "protocol is 'linear'; use `avidfast eval linear`" in capsys.readouterr().err
    missing = str(tmp_path / "nope.csv")
    assert _cli(missing, checkpoint, tmp_path / "missing") == 2
    assert missing in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled.csv"
    rows = open(manifest).read().splitlines()
    unlabelled.write_text("path\n" + "\n".join(os.path.join(os.path.dirname(manifest), r.split(",")[0])
                                                for r in rows[1:]) + "\n")
    assert _cli(unlabelled, checkpoint, tmp_path / "unlabelled") == 2
    assert f"{unlabelled}: the evaluation needs a 'label'" in capsys.readouterr().err
    assert _cli(manifest, str(tmp_path / "none.pt"), tmp_path / "nockpt") == 2
    assert "none.pt: no such file" in capsys.readouterr().err
    assert _cli(manifest, checkpoint, tmp_path / "big", "optim.batch_size=64") == 2
    assert "fewer training clips than one batch" in capsys.readouterr().err


def test_memory_probe_entry_point_and_one_line_errors(pretrained, tmp_path, capsys):
    from avidfast.eval import MemoryProbeSettings, run_memory_probe

    manifest, checkpoint = pretrained
    out = tmp_path / "memory"
    result = run_memory_probe(MemoryProbeSettings(checkpoint, repeats=2, epochs=2, device="cpu", out=str(out)))
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"] == "memory" and saved["num_classes"] == NUM_CLASSES == result.num_classes
    assert saved["top1"] == result.top1 and len(result.top1["combined"]) == 2
    assert "memory probe (trained banks" in capsys.readouterr().out

    command = ["eval", "memory", "--checkpoint", checkpoint, "--repeats", "2", "--epochs", "2", "--out",
               str(tmp_path / "bad")]
    assert main(command + ["--device", "gpu"]) == 2
    assert "--device gpu: not a device" in capsys.readouterr().err
    assert main(command + ["--train-fraction", "1.5"]) == 2
    assert "--train-fraction 1.5: must lie between 0 and 1" in capsys.readouterr().err
    short = tmp_path / "short.csv"
    short.write_text("\n".join(open(manifest).read().splitlines()[:6]) + "\n")
    assert main(command + ["--labels", str(short), "--root", os.path.dirname(manifest)]) == 2
    assert f"--labels {short}: 5 rows, but the banks have {NUM_VIDEOS} slots" in capsys.readouterr().err
