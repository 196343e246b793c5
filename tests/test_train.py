"""Training: configs, exact resume, precision paths, SIGTERM, two-process banks."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from avidfast.checkpoints import store as ckpt
from avidfast.checkpoints.build import build_criterion, build_model
from avidfast.config import ConfigError, config_from_dict, load_config, shipped_configs
from avidfast.data.synthetic import make_dataset
from avidfast.train.loop import TrainingError, train
from tiny_training import TINY, tiny_config, tiny_set  # noqa: F401 - tiny_set is a fixture


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_parses_and_builds(name):
    cfg = load_config(name)
    model = build_model(cfg)
    init = None
    if cfg.loss.kind == "cma":
        avid = build_criterion(config_from_dict({**cfg.to_dict(), "loss": {"kind": "avid", "num_negatives": 100}}), 2000)
        init = {"criterion": avid.state_dict()}
    criterion = build_criterion(cfg, 2000, init)
    assert type(criterion).__name__ == ("CMALoss" if cfg.loss.kind == "cma" else "AVIDLoss")
    assert cfg.model.preset in ("table5", "table6") and sum(p.numel() for p in model.parameters()) > 0


def test_table3_rows_hold_the_papers_hyper_parameters():
    rows = {"avid_s4_audioset": (32, 5e-4, 1e-5, 400, 100_000), "avid_s6_audioset": (32, 5e-4, 1e-5, 200, 1_800_000),
            "avid_s6_kinetics": (32, 2e-4, 1e-5, 300, 240_000), "cma_s5_audioset": (32, 5e-4, 1e-5, 200, 100_000),
            "cma_s6_audioset": (32, 5e-4, 1e-5, 200, 1_800_000), "cma_s6_kinetics": (32, 2e-4, 1e-5, 300, 240_000)}
    for name, (bs, lr, wd, ep, es) in rows.items():
        cfg = load_config(name)
        o = cfg.optim
        assert (cfg.per_process_batch(8), o.lr, o.weight_decay, o.epochs, o.samples_per_epoch) == (bs, lr, wd, ep, es), name
        assert o.batch_size is None and o.global_batch_size == 8 * bs, name  # Table 3's bs per GPU, 8 GPUs
        v = load_config(name).data.video
        assert (v.min_area, v.flip, v.brightness, v.saturation, v.contrast, v.hue) == (0.08, 0.5, 0.4, 0.4, 0.4, 0.2)


def test_a_global_batch_is_divided_over_the_processes_and_recorded(tiny_set, tmp_path):
    import json

    cfg = load_config("avid_s6_kinetics")
    assert [cfg.per_process_batch(w) for w in (1, 2, 4, 8)] == [256, 128, 64, 32]
    with pytest.raises(ConfigError, match=r"optim.global_batch_size=256 does not divide over 3 processes: launch .*8, "
                                          r".*--set optim.global_batch_size=255 \(a multiple of 3\)"):
        cfg.per_process_batch(3)
    with pytest.raises(ConfigError, match="set exactly one of optim.batch_size .* and optim.global_batch_size"):
        load_config("avid_s6_kinetics", ["optim.batch_size=32"])
    with pytest.raises(ConfigError, match="set exactly one of"):
        load_config("demo", ["optim.batch_size=null"])
    with pytest.raises(ConfigError, match="optim.global_batch_size must be positive"):
        load_config("demo", ["optim.batch_size=null", "optim.global_batch_size=0"])
    run = tmp_path / "run"
    train(tiny_config(tiny_set, run, "optim.batch_size=null", "optim.global_batch_size=4", "optim.epochs=1"))
    meta = json.loads((run / "meta.json").read_text())
    assert (meta["batch_size_per_process"], meta["global_batch_size"], meta["world_size"]) == (4, 4, 1)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'.*lr"):
        load_config("demo", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="optim.batch_size: expected an integer"):
        load_config("demo", ["optim.batch_size=big"])
    with pytest.raises(ConfigError, match="loss.mode: 'crosss' is not one of"):
        load_config("demo", ["loss.mode=crosss"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("demo", ["optim.lr"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config("nonexistent_config")
    with pytest.raises(ConfigError, match="loss.init_from"):
        load_config("cma_s5_audioset", ["loss.init_from=null"])
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_config("demo", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="model.head_input_norm needs batch statistics.*optim.batch_size"):
        load_config("demo", ["optim.batch_size=1"])
    assert load_config("demo", ["optim.batch_size=1", "model.head_input_norm=false"]).optim.batch_size == 1


def test_numbers_in_e_notation_without_a_dot_are_numbers():
    # YAML 1.1 reads 1e-3 as a string; configs and --set accept it as the number users mean
    assert load_config("demo", ["optim.lr=1e-3"]).optim.lr == 1e-3
    assert load_config("demo", ["optim.weight_decay=5E-5"]).optim.weight_decay == 5e-5


def _final_state(run_dir):
    return ckpt.load_checkpoint(os.path.join(run_dir, "checkpoints", "last.pt"))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [line.split(",")[:3] for line in f.read().splitlines()[1:]]


def test_two_epochs_equal_one_epoch_resume_one_epoch(tiny_set, tmp_path):
    straight = train(tiny_config(tiny_set, tmp_path / "straight"))
    assert straight.epochs_done == 2 and straight.steps == 4 and not straight.interrupted
    train(tiny_config(tiny_set, tmp_path / "split", "optim.epochs=1"))
    resumed = train(tiny_config(tiny_set, tmp_path / "split"), resume=True)
    assert resumed.steps == 2
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    for part in ("model", "criterion"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "split")
    assert straight.last_loss == resumed.last_loss


def test_resume_in_the_middle_of_an_epoch_is_exact(tiny_set, tmp_path):
    train(tiny_config(tiny_set, tmp_path / "straight"))
    stopped = train(tiny_config(tiny_set, tmp_path / "split"), max_steps=3)
    state = _final_state(tmp_path / "split")
    assert (state["epoch"], state["batches_done"]) == (1, 1) and stopped.steps == 3
    train(tiny_config(tiny_set, tmp_path / "split"), resume=True)
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    for key in a["criterion"]:
        assert torch.equal(a["criterion"][key], b["criterion"][key]), key
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_a_second_run_in_the_same_folder_needs_resume(tiny_set, tmp_path):
    train(tiny_config(tiny_set, tmp_path / "run", "optim.epochs=1"))
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_config(tiny_set, tmp_path / "run", "optim.epochs=1"))
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(tiny_config(tiny_set, tmp_path / "other"), resume=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_run(tiny_set, tmp_path, precision):
    result = train(tiny_config(tiny_set, tmp_path / precision, f"train.precision={precision}", "optim.epochs=1"))
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.last_loss))
    state = _final_state(tmp_path / precision)
    assert state["scaler"] != {} if precision == "fp16" else True
    assert all(v.dtype != torch.float16 for v in state["model"].values())  # weights stay float32


def test_run_folder_holds_config_provenance_and_logs(tiny_set, tmp_path):
    import json

    import yaml

    train(tiny_config(tiny_set, tmp_path / "run", "optim.epochs=1"))
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["manifest"] == tiny_set and saved["model"]["width"] == 4
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 0 and "torch" in meta["versions"] and meta["commit"]
    assert "epoch 1/1" in (run / "train.log").read_text()
    assert any(name.startswith("events") for name in os.listdir(run / "tb"))
    assert set(os.listdir(run / "checkpoints")) == {"last.pt", "epoch_0001.pt"}


def test_cma_starts_from_an_avid_checkpoint(tiny_set, tmp_path):
    train(tiny_config(tiny_set, tmp_path / "avid", "optim.epochs=1"))
    avid = _final_state(tmp_path / "avid")
    init = str(tmp_path / "avid" / "checkpoints" / "epoch_0001.pt")
    result = train(tiny_config(tiny_set, tmp_path / "cma", "loss.kind=cma", f"loss.init_from={init}", "loss.num_positives=2",
                        "loss.num_negatives=3", "loss.num_negatives_within=2", "optim.epochs=1"))
    assert result.steps == 2
    cma = _final_state(tmp_path / "cma")
    assert (cma["criterion"]["positives"] >= 0).all()  # mined at the start
    # the AVID stage's one partition constant serves every CMA term, unchanged
    assert (avid["criterion"]["Z"] > 0).all() and (avid["criterion"]["Z"] == avid["criterion"]["Z"][0]).all()
    assert torch.equal(cma["criterion"]["Z"], avid["criterion"]["Z"])
    assert "positive sets re-mined every 10 epochs: loss.resample_every=10 reference epochs" in (
        tmp_path / "cma" / "train.log").read_text()


def test_cma_mining_period_is_counted_in_reference_epochs():
    """resample_every counts the reference's epochs (reference_epoch_passes passes over the data):
    the paper configs re-mine after as many clips as the reference does."""
    rows = {"cma_s6_audioset": (1_784_108, 10 * 5, 50), "cma_s6_kinetics": (232_067, 5 * 10, 48),
            "cma_s5_audioset": (100_000, 10 * 5, 50)}
    for name, (num_items, passes, epochs) in rows.items():
        cfg = load_config(name)
        assert cfg.loss.resample_every * cfg.loss.reference_epoch_passes == passes, name
        assert cfg.resample_period_epochs(num_items) == epochs, name
        clips = epochs * cfg.optim.samples_per_epoch
        assert abs(clips - passes * num_items) <= cfg.optim.samples_per_epoch / 2, name
    plain = load_config("demo", ["loss.resample_every=3", "optim.samples_per_epoch=null"])
    assert plain.loss.reference_epoch_passes == 1 and plain.resample_period_epochs(500) == 3
    assert load_config("demo", ["loss.resample_every=1", "optim.samples_per_epoch=10000"]).resample_period_epochs(10) == 1
    with pytest.raises(ConfigError, match="loss.reference_epoch_passes must be positive"):
        load_config("cma_s5_audioset", ["loss.init_from=x.pt", "loss.reference_epoch_passes=0"])


def test_sigterm_mid_epoch_leaves_a_loadable_checkpoint(tiny_set, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "avidfast.cli", "train", "demo"] + [
        f"--set={item}" for item in TINY + [f"data.manifest={tiny_set}", f"out_dir={run}", "optim.epochs=50"]]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] < 50 and "stopped at epoch" in output
    resumed = train(tiny_config(tiny_set, run, "optim.epochs=1" if state["epoch"] == 0 else f"optim.epochs={state['epoch'] + 1}"),
                    resume=True)
    assert not resumed.interrupted


def test_too_many_negatives_for_the_manifest_is_a_one_line_config_error(tiny_set, tmp_path):
    """`avidfast train` refuses loss.num_negatives the sampler cannot draw: exit 2, one line, nothing written."""
    run = tmp_path / "run"
    cli = os.path.join(os.path.dirname(sys.executable), "avidfast")  # the installed console script
    command = [cli] if os.path.isfile(cli) else [sys.executable, "-m", "avidfast.cli"]
    items = TINY + [f"data.manifest={tiny_set}", f"out_dir={run}", "loss.num_negatives=7"]  # 8 rows: at most 6
    done = subprocess.run(command + ["train", "demo"] + [f"--set={item}" for item in items], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"avidfast: error: loss.num_negatives=7 does not fit the manifest {tiny_set}: it has 8 rows, and a clip's "
        "negatives are drawn from the other rows (at most rows - 2 = 6); --set loss.num_negatives=6 or less, "
        "or use a larger manifest"], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (run / "checkpoints" / "last.pt").exists() and not run.exists()  # refused before anything is written


def test_the_negatives_bound_is_the_samplers(tiny_set, tmp_path):
    from avidfast.losses import CMALoss

    assert type(build_criterion(tiny_config(tiny_set, tmp_path, "loss.num_negatives=6"), 8)).__name__ == "AVIDLoss"  # N - 2
    with pytest.raises(ConfigError, match=r"loss.num_negatives=7 does not fit .* 8 rows"):
        build_criterion(tiny_config(tiny_set, tmp_path, "loss.num_negatives=7"), 8)
    # CMA: the P positives are excluded too, so K <= N - P - 2
    cma = ["loss.kind=cma", "loss.init_from=avid.pt", "loss.num_positives=2", "loss.num_negatives_within=2"]
    tiny_config(tiny_set, tmp_path, *cma, "loss.num_negatives=4").check_num_items(8)
    CMALoss(8, num_negatives=4, num_negatives_within=2, num_positives=2)
    with pytest.raises(ConfigError, match=r"other than itself and its loss.num_positives=2 positives \(at most rows - "
                                          r"loss.num_positives - 2 = 4\); --set loss.num_negatives=4 or less \(or fewer "
                                          r"loss.num_positives\), or use a larger manifest$"):
        tiny_config(tiny_set, tmp_path, *cma, "loss.num_negatives=5").check_num_items(8)
    with pytest.raises(ValueError):
        CMALoss(8, num_negatives=5, num_negatives_within=2, num_positives=2)
    with pytest.raises(ConfigError, match=r"2 rows.*\(none are left\); use a manifest of at least 3 rows$"):
        tiny_config(tiny_set, tmp_path, "loss.num_negatives=1").check_num_items(2)
    with pytest.raises(ConfigError, match=r"\(none are left\); use a manifest of at least 35 rows, or --set "
                                          r"loss.num_positives=5 or less$"):
        tiny_config(tiny_set, tmp_path, "loss.kind=cma", "loss.init_from=avid.pt", "loss.num_negatives=1024").check_num_items(8)
    with pytest.raises(ConfigError, match=r"loss.num_negatives_within=5 must lie in \[1, loss.num_negatives = 4\]"):
        tiny_config(tiny_set, tmp_path, *cma, "loss.num_negatives=4", "loss.num_negatives_within=5")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, manifest, out_dir, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    try:
        result = train(tiny_config(manifest, out_dir, "optim.batch_size=2", "optim.epochs=1"), max_steps=2)
        torch.save({k: v.clone() for k, v in result.criterion.state_dict().items()},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_processes_keep_identical_banks(tiny_set, tmp_path):
    mp.spawn(_rank_worker, args=(2, _free_port(), tiny_set, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert int(ranks[0]["step"]) == 2
    start = build_criterion(tiny_config(tiny_set, tmp_path / "x"), 8).state_dict()
    assert not torch.equal(start["video_memory.memory"], ranks[0]["video_memory.memory"])  # they were updated


def test_audio_preset_must_feed_the_model_preset():
    with pytest.raises(ConfigError, match=r"data.audio.preset=table6 gives 257 frequency bins, but model.preset=table5 "
                                          r"is built for 129; --set data.audio.preset=table5"):
        load_config("demo", ["data.audio.preset=table6"])
    with pytest.raises(ConfigError, match=r"data.audio.preset=table5 gives 129 .* --set data.audio.preset=table6 or "
                                          r"reference"):
        load_config("avid_s6_kinetics", ["data.audio.preset=table5"])
    assert load_config("avid_s6_kinetics", ["data.audio.preset=reference", "data.pipeline=cpu"]).data.audio.preset \
        == "reference"
    with pytest.raises(ConfigError, match="data.audio.preset=reference is computed by the CPU pipeline only"):
        load_config("avid_s6_kinetics", ["data.audio.preset=reference", "data.pipeline=dali"])


def test_config_choices_are_the_registries():
    from avidfast.data.audio import PRESETS
    from avidfast.losses.avid import MODES
    from avidfast.losses.memory_bank import STORAGE_DTYPES
    from avidfast.ops.cma import AGREEMENTS

    for key, registry in (("data.audio.preset", PRESETS), ("loss.mode", MODES), ("loss.bank_dtype", STORAGE_DTYPES),
                          ("loss.agreement", AGREEMENTS)):
        with pytest.raises(ConfigError) as error:
            load_config("demo", [f"{key}=nonsense"])
        assert str(error.value).endswith("is not one of " + ", ".join(registry)), (key, str(error.value))


def test_cma_banks_take_the_configured_storage_dtype():
    avid_cfg = config_from_dict({**load_config("demo").to_dict(), "loss": {"kind": "avid", "num_negatives": 16}})
    avid = build_criterion(avid_cfg, 200)
    assert avid.video_memory.memory.dtype == torch.float32
    cma_cfg = load_config("cma_s5_audioset", ["loss.init_from=unused.pt", "loss.bank_dtype=bfloat16",
                                              "loss.num_negatives=16", "loss.num_negatives_within=8",
                                              "loss.num_positives=4", "model.embed_dim=128"])
    cma = build_criterion(cma_cfg, 200, {"criterion": avid.state_dict()})
    for bank, source in ((cma.video_memory.memory, avid.video_memory.memory),
                         (cma.audio_memory.memory, avid.audio_memory.memory)):
        assert bank.dtype == torch.bfloat16
        torch.testing.assert_close(bank, source.to(torch.bfloat16))


def test_spectrogram_statistics_are_computed_once_beside_the_manifest_or_refused(tmp_path, monkeypatch):
    """Training never silently uses un-normalised dB values: no data.audio.stats means computing
    them on first use, cached beside the manifest and reused; false normalisation is explicit."""
    import yaml

    import avidfast.train.audio_stats as audio_stats
    from avidfast.data.audio import SpectrogramStats

    manifest = make_dataset(str(tmp_path / "set"), num_videos=6, num_classes=2, seconds=2.0, seed=2, size=(64, 48),
                            workers=1)
    cache = os.path.splitext(manifest)[0] + ".table5-stats.npz"
    calls = []
    original = audio_stats.compute_stats
    monkeypatch.setattr(audio_stats, "compute_stats", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    train(tiny_config(manifest, tmp_path / "first", "optim.epochs=1"))
    assert calls == [1] and os.path.isfile(cache)
    assert SpectrogramStats.load(cache).mean.numel() == 129
    saved = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert saved["data"]["audio"]["stats"] == cache and saved["data"]["audio"]["normalize"] is True
    train(tiny_config(manifest, tmp_path / "second", "optim.epochs=1"))
    assert calls == [1], "the cached statistics are reused"
    plain = train(tiny_config(manifest, tmp_path / "plain", "optim.epochs=1", "data.audio.normalize=false"))
    assert plain.steps >= 1 and calls == [1]
    assert yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["data"]["audio"]["stats"] is None
    with pytest.raises(ConfigError, match="data.audio.normalize is false but data.audio.stats=x.npz is set"):
        tiny_config(manifest, tmp_path / "x", "data.audio.normalize=false", "data.audio.stats=x.npz")
    # a cache that cannot be written (here a folder in its place): an error naming the command, nothing trained
    os.remove(cache)
    os.mkdir(cache)
    with pytest.raises(TrainingError, match=r"cannot be written: compute the statistics with `avidfast stats "):
        train(tiny_config(manifest, tmp_path / "refused", "optim.epochs=1"))
    assert calls == [1] and not (tmp_path / "refused" / "checkpoints").exists()
