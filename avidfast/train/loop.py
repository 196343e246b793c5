"""The training loop: AVID or CMA pre-training on one CPU, one GPU or many (torchrun).

One process per GPU (or one CPU process per torchrun rank): the encoders are wrapped in
DistributedDataParallel, the loss all-gathers embeddings to update identical banks on every
rank, rank 0 writes logs and checkpoints. Each epoch reads ``samples_per_epoch`` clips in total
across ranks (Table 3's "es"). A checkpoint is written after every epoch and on SIGTERM / Ctrl-C
(mid-epoch, with the position reached); ``resume`` continues from it exactly.

:func:`train` reads as the run goes: the previous state (resume), the run folder, the starting
model and criterion (:func:`_starting_point`: fresh, a reference checkpoint, CMA from AVID, or
the resumed run), devices and wrappers, then one :func:`_train_epoch` per epoch. The step itself
is avidfast.train.step.TrainStep; metrics.csv and TensorBoard are avidfast.train.metrics.
"""
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from avidfast.checkpoints import store as ckpt
from avidfast.checkpoints.build import build_criterion, build_model, load_reference_init
from avidfast.config import Config
from avidfast.distributed import init_from_env
from avidfast.errors import TrainingError
from avidfast.ops import check_errors
from avidfast.train.metrics import MetricsSink
from avidfast.train.run_folder import setup_logging, write_run_files
from avidfast.train.step import TrainStep, autocast_dtype, to_channels_last

__all__ = ["TrainResult", "TrainingError", "build_loader", "train"]


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    run_dir: str
    epochs_done: int  # finished epochs
    steps: int  # optimiser steps in this call
    last_loss: float
    checkpoint: Optional[str]
    interrupted: bool  # stopped by SIGTERM / SIGINT (a resumable checkpoint was written)
    clips_per_second: float
    model: torch.nn.Module  # the trained AVModel (unwrapped from DDP / compile), on its device
    criterion: torch.nn.Module  # the AVIDLoss / CMALoss with its banks (identical on every rank)


class _StopFlag:
    """Set by SIGTERM / SIGINT; training saves and returns at the next batch boundary."""

    def __init__(self):
        self.raised = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_loader(cfg: Config, manifest, rank: int, world: int, device: torch.device):
    """The CPU or DALI training loader of cfg.data."""
    from avidfast.data.audio import AudioJitter, SpectrogramStats, get_preset

    video = cfg.data.video.to_video_config()
    a = cfg.data.audio
    preset = get_preset(a.preset)
    jitter = AudioJitter(volume=tuple(a.volume), max_offset=a.max_offset, duration=tuple(a.duration))
    stats = SpectrogramStats.load(a.stats, preset) if a.stats else None
    if cfg.data.pipeline == "dali":
        from avidfast.data.dali_pipeline import build_dali_loader

        if device.type != "cuda":
            raise TrainingError("data.pipeline=dali needs a GPU; use --set data.pipeline=cpu on this machine")
        return build_dali_loader(
            manifest, video=video, audio_preset=preset, stats=stats, batch_size=cfg.optim.batch_size,
            mode="train", seed=cfg.seed, rank=rank, world_size=world, device_id=device.index or 0,
            num_threads=max(1, cfg.data.workers), jitter=jitter, samples_per_epoch=cfg.optim.samples_per_epoch,
            max_bad_fraction=cfg.data.max_bad_fraction,
        )
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader

    dataset = ClipDataset(manifest, video=video, audio_preset=preset, stats=stats, mode="train", jitter=jitter,
                          seed=cfg.seed)
    return CPULoader(dataset, batch_size=cfg.optim.batch_size, workers=cfg.data.workers, rank=rank,
                     world_size=world, samples_per_epoch=cfg.optim.samples_per_epoch,
                     max_bad_fraction=cfg.data.max_bad_fraction)


def _lr_at(cfg: Config, epoch: int) -> float:
    return cfg.optim.lr * cfg.optim.gamma ** sum(1 for m in cfg.optim.milestones if epoch >= m)


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@dataclass
class _Run:
    """What one call of :func:`train` works with, once built."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    last_path: str
    num_items: int
    model: torch.nn.Module  # the AVModel
    net: torch.nn.Module  # model, under DDP and / or torch.compile when asked
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Any
    step: TrainStep
    metrics: MetricsSink
    log: Any

    def save(self, epoch: int, batches_done: int, keep: bool = False) -> str:
        """Writes last.pt (and epoch_NNNN.pt when ``keep``) on rank 0; every rank waits for it."""
        if self.rank == 0:
            payload = {
                "model": ckpt.strip_module_prefix(_unwrap(self.net).state_dict()),
                "criterion": self.criterion.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "batches_done": batches_done,
                "rng": ckpt.rng_state(), "config": self.cfg.to_dict(),
                "meta": {"time": time.time(), "world_size": self.world, "num_items": self.num_items},
            }
            ckpt.save_checkpoint(self.last_path, payload)
            if keep:
                ckpt.save_checkpoint(os.path.join(self.cfg.run_dir, ckpt.CHECKPOINT_DIR, ckpt.epoch_name(epoch)),
                                     payload)
        if self.world > 1:
            dist.barrier()
        return self.last_path


@dataclass
class _Tally:
    """What this call of :func:`train` has done so far."""

    started: float  # time.perf_counter() when training started
    total_batches: int  # batches this call will train if nothing stops it
    steps: int = 0
    clips: int = 0  # over all ranks
    last_loss: float = float("nan")
    interrupted: bool = False  # stopped by SIGTERM / SIGINT


def train(cfg: Config, *, resume: bool = False, max_steps: Optional[int] = None,
          trust_reference: bool = False) -> TrainResult:
    """Runs (or resumes) the training of ``cfg``; returns what was done.

    max_steps stops after that many optimiser steps in this call (with a mid-epoch checkpoint,
    as on SIGTERM): used by tests and for quick trials. trust_reference lets
    cfg.loss.init_from_reference be read beyond weights_only (see load_reference_checkpoint).
    """
    from avidfast.data.manifest import read_manifest

    if not cfg.data.manifest:
        raise TrainingError("data.manifest is not set: --set data.manifest=PATH (a CSV from `avidfast prepare`)")
    rank, world, local_rank = init_from_env()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    last_path = os.path.join(cfg.run_dir, ckpt.CHECKPOINT_DIR, ckpt.LAST)
    state = _previous_state(cfg.run_dir, last_path, resume)
    manifest = read_manifest(cfg.data.manifest, cfg.data.root)
    cfg.check_num_items(len(manifest))  # a ConfigError before anything is written to run_dir
    log = setup_logging(cfg.run_dir, rank)
    if rank == 0:
        write_run_files(cfg.run_dir, cfg.to_dict(), {"seed": cfg.seed, "world_size": world, "resumed": resume,
                                                     "num_items": len(manifest)})
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark

    model, criterion = _starting_point(cfg, len(manifest), state, trust_reference, device, log)
    model = _place(model, cfg, world, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, skip_batches = 0, 0
    if state is not None:
        start_epoch, skip_batches = _restore(state, model, criterion, optimizer, scaler)
        log.info("resumed from %s: epoch %d, %d batches done", last_path, start_epoch, skip_batches)
    net = _wrap(model, cfg, world, local_rank, device)
    loader = build_loader(cfg, manifest, rank, world, device)
    run = _Run(cfg, rank, world, device, last_path, len(manifest), model, net, criterion, optimizer, scaler, loader,
               TrainStep(net, criterion, optimizer, scaler, device, amp_dtype, cfg.train.channels_last),
               MetricsSink(cfg.run_dir, cfg.train.log_every, enabled=rank == 0), log)
    log.info("training %s: %s %s, N=%d, %d process(es), %s, precision %s, %d batches/epoch, epochs %d..%d",
             cfg.name, cfg.loss.kind, cfg.loss.mode if cfg.loss.kind == "avid" else cfg.loss.agreement,
             len(manifest), world, device, amp_dtype or "fp32", len(loader), start_epoch + 1, cfg.optim.epochs)

    tally = _Tally(time.perf_counter(), len(loader) * (cfg.optim.epochs - start_epoch) - skip_batches)
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.optim.epochs):
            if _train_epoch(run, epoch, skip_batches, tally, stop, max_steps):
                return _finish(run, epoch, tally)
            skip_batches = 0
    return _finish(run, cfg.optim.epochs, tally)


def _previous_state(run_dir: str, last_path: str, resume: bool) -> Optional[Dict]:
    """The checkpoint to resume from (``resume``), or None for a new run in a folder without one."""
    if resume:
        if not os.path.isfile(last_path):
            raise TrainingError(f"--resume: no checkpoint at {last_path}; start without --resume")
        return ckpt.load_checkpoint(last_path)
    if os.path.isfile(last_path):
        raise TrainingError(f"{run_dir} already holds a run ({last_path}); pass --resume to continue it, "
                            "or choose another --set out_dir=... / name=...")
    return None


def _starting_point(cfg: Config, num_items: int, state: Optional[Dict], trust_reference: bool,
                    device: torch.device, log) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """The model (on the CPU) and criterion (on ``device``) training starts from.

    fresh: built from cfg.seed. Reference (loss.init_from_reference): weights, and banks and Z
    when the file has them, of a checkpoint of the paper's code. CMA (loss.init_from): the AVID
    run's weights and banks. Resume (``state``): a CMA criterion is built from the resumed banks;
    everything else is restored afterwards by :func:`_restore`.
    """
    model = build_model(cfg)
    init = None
    if cfg.loss.init_from_reference and state is None:
        init = load_reference_init(cfg, model, num_items, trust_reference)
        log.info("%s from the reference checkpoint %s", "model" if init is None else "model, banks and Z",
                 cfg.loss.init_from_reference)
    elif cfg.loss.kind == "cma" and state is None:
        init = ckpt.load_checkpoint(cfg.loss.init_from, label="loss.init_from")
        model.load_state_dict(ckpt.strip_module_prefix(init["model"]))
        log.info("CMA starts from %s (epoch %s)", cfg.loss.init_from, init.get("epoch"))
    elif cfg.loss.kind == "cma":
        init = {"criterion": state["criterion"]}
    criterion = build_criterion(cfg, num_items, init).to(device)
    if cfg.loss.kind == "avid" and init is not None:  # banks and Z of a reference checkpoint
        criterion.load_state_dict(init["criterion"])
    return model, criterion


def _place(model: torch.nn.Module, cfg: Config, world: int, device: torch.device) -> torch.nn.Module:
    """The model on ``device``, channels-last and with SyncBatchNorm when the config asks."""
    model = model.to(device)
    if cfg.train.channels_last:
        to_channels_last(model)
    if cfg.train.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _restore(state: Dict, model, criterion, optimizer, scaler) -> Tuple[int, int]:
    """Loads a resumed checkpoint's weights, banks, optimiser, scaler and RNG states; returns
    (epoch to continue, batches of it already done)."""
    model.load_state_dict(state["model"])
    criterion.load_state_dict(state["criterion"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])
    return int(state["epoch"]), int(state["batches_done"])


def _wrap(model: torch.nn.Module, cfg: Config, world: int, local_rank: int, device: torch.device) -> torch.nn.Module:
    """``model`` under DistributedDataParallel (several processes) and torch.compile (when asked)."""
    net = model
    if world > 1:
        device_ids = [local_rank] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


def _train_epoch(run: _Run, epoch: int, skip_batches: int, tally: _Tally, stop: "_StopFlag",
                 max_steps: Optional[int]) -> bool:
    """Trains (0-based) ``epoch`` from batch ``skip_batches`` on and checkpoints it.

    Returns True when a signal or max_steps stopped it early (after a mid-epoch checkpoint),
    False after a finished epoch (checkpointed as last.pt, and epoch_NNNN.pt when kept).
    """
    cfg, log = run.cfg, run.log
    for group in run.optimizer.param_groups:
        group["lr"] = _lr_at(cfg, epoch)
    if hasattr(run.criterion, "set_epoch"):
        run.criterion.set_epoch(epoch, progress=cfg.train.progress and run.rank == 0)
    run.loader.set_epoch(epoch, skip_batches=skip_batches)
    run.net.train()
    bar = _progress(len(run.loader), skip_batches, f"epoch {epoch + 1}/{cfg.optim.epochs}",
                    cfg.train.progress and run.rank == 0)
    batches_done = skip_batches
    data_wait = time.perf_counter()
    for batch in run.loader:
        data_time = time.perf_counter() - data_wait
        t0 = time.perf_counter()
        result = run.step(batch)
        tally.steps += 1
        batches_done += 1
        tally.last_loss = float(result.loss)
        if not math.isfinite(tally.last_loss):
            run.save(epoch, batches_done)
            check_errors()  # a bad index or Z the CUDA kernels recorded names itself (ValueError)
            raise TrainingError(f"loss became {tally.last_loss} at epoch {epoch + 1}, batch {batches_done}; "
                                "the last checkpoint is kept; try a lower optim.lr or train.precision=fp32")
        step_time = time.perf_counter() - t0
        clips = result.batch_size * run.world
        tally.clips += clips
        clips_per_s = clips / (step_time + data_time)
        if bar is not None:
            bar.update(1)
            done = tally.steps / max(tally.total_batches, 1)
            eta = (time.perf_counter() - tally.started) * (1 - done) / max(done, 1e-9)
            bar.set_postfix(loss=f"{tally.last_loss:.4f}", clips_s=f"{clips_per_s:.1f}", run_eta=_hms(eta))
        run.metrics.step(int(run.criterion.step), epoch + 1, tally.last_loss, run.optimizer.param_groups[0]["lr"],
                         clips_per_s, data_time, getattr(run.loader, "bad_samples", 0), result.logs)
        if _agreed(stop.raised or (max_steps is not None and tally.steps >= max_steps), run.world, run.device):
            tally.interrupted = stop.raised
            run.save(epoch, batches_done)
            log.info("stopped at epoch %d, batch %d%s; resume with --resume", epoch + 1, batches_done,
                     " (signal)" if tally.interrupted else "")
            if bar is not None:
                bar.close()
            return True
        data_wait = time.perf_counter()
    if bar is not None:
        bar.close()
    check_errors()  # what the CUDA kernels recorded in the epoch's last step (one sync per epoch)
    keep = (epoch + 1) in cfg.train.keep_epochs or epoch + 1 == cfg.optim.epochs
    run.save(epoch + 1, 0, keep=keep)
    run.metrics.epoch(epoch + 1, tally.last_loss, getattr(run.loader, "bad_samples", 0))
    log.info("epoch %d/%d: loss %.4f, %d bad samples, checkpoint %s", epoch + 1, cfg.optim.epochs,
             tally.last_loss, getattr(run.loader, "bad_samples", 0), run.last_path)
    return False


def _agreed(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when any rank raised the flag (one all-reduce per step under DDP)."""
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def _finish(run: _Run, epochs_done: int, tally: _Tally) -> TrainResult:
    elapsed = time.perf_counter() - tally.started
    rate = tally.clips / elapsed if elapsed > 0 else 0.0
    run.metrics.close()
    run.log.info("done: %d steps in %s (%.1f clips/s over all ranks), last loss %.4f, checkpoint %s%s", tally.steps,
                 _hms(elapsed), rate, tally.last_loss, run.last_path,
                 " (interrupted: resume with --resume)" if tally.interrupted else "")
    return TrainResult(run.cfg.run_dir, epochs_done, tally.steps, tally.last_loss, run.last_path, tally.interrupted,
                       rate, run.model, run.criterion)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
