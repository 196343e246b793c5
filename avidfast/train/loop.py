"""The training loop: AVID or CMA pre-training on one CPU, one GPU or many (torchrun).

One process per GPU (or one CPU process per torchrun rank): the encoders are wrapped in
DistributedDataParallel, the loss all-gathers embeddings to update identical banks on every
rank, rank 0 writes logs and checkpoints. Each epoch reads ``samples_per_epoch`` clips in total
across ranks (Table 3's "es"). A checkpoint is written after every epoch and on SIGTERM / Ctrl-C
(mid-epoch, with the position reached); ``resume`` continues from it exactly.
"""
import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

from avidfast.checkpoints import store as ckpt
from avidfast.checkpoints.build import build_criterion, build_model, load_reference_init
from avidfast.config import Config
from avidfast.distributed import init_from_env
from avidfast.errors import TrainingError
from avidfast.train.run_folder import setup_logging, write_run_files

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


def _precision(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    choice = cfg.train.precision
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            choice = "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[choice]


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
    run_dir = cfg.run_dir
    last_path = os.path.join(run_dir, ckpt.CHECKPOINT_DIR, ckpt.LAST)
    state = None
    if resume:
        if not os.path.isfile(last_path):
            raise TrainingError(f"--resume: no checkpoint at {last_path}; start without --resume")
        state = ckpt.load_checkpoint(last_path)
    elif os.path.isfile(last_path):
        raise TrainingError(f"{run_dir} already holds a run ({last_path}); pass --resume to continue it, "
                            "or choose another --set out_dir=... / name=...")
    manifest = read_manifest(cfg.data.manifest, cfg.data.root)
    cfg.check_num_items(len(manifest))  # a ConfigError before anything is written to run_dir
    log = setup_logging(run_dir, rank)
    if rank == 0:
        write_run_files(run_dir, cfg.to_dict(), {"seed": cfg.seed, "world_size": world, "resumed": resume,
                                                 "num_items": len(manifest)})
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark

    model = build_model(cfg)
    init = None
    if cfg.loss.init_from_reference and state is None:
        init = load_reference_init(cfg, model, len(manifest), trust_reference)
        log.info("%s from the reference checkpoint %s", "model" if init is None else "model, banks and Z",
                 cfg.loss.init_from_reference)
    elif cfg.loss.kind == "cma" and state is None:
        init = ckpt.load_checkpoint(cfg.loss.init_from)
        model.load_state_dict(ckpt.strip_module_prefix(init["model"]))
        log.info("CMA starts from %s (epoch %s)", cfg.loss.init_from, init.get("epoch"))
    elif cfg.loss.kind == "cma":
        init = {"criterion": state["criterion"]}
    criterion = build_criterion(cfg, len(manifest), init).to(device)
    if cfg.loss.kind == "avid" and init is not None:  # banks and Z of a reference checkpoint
        criterion.load_state_dict(init["criterion"])
    model = model.to(device)
    if cfg.train.channels_last:
        model.video.to(memory_format=torch.channels_last_3d)
        model.audio.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    amp_dtype = _precision(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, skip_batches = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        start_epoch, skip_batches = int(state["epoch"]), int(state["batches_done"])
        log.info("resumed from %s: epoch %d, %d batches done", last_path, start_epoch, skip_batches)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    loader = build_loader(cfg, manifest, rank, world, device)
    writer, metrics = None, None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tb"))
        metrics_path = os.path.join(run_dir, "metrics.csv")
        fresh = not os.path.isfile(metrics_path)
        metrics = open(metrics_path, "a")
        if fresh:
            metrics.write("step,epoch,loss,lr,clips_per_s\n")
    log.info("training %s: %s %s, N=%d, %d process(es), %s, precision %s, %d batches/epoch, epochs %d..%d",
             cfg.name, cfg.loss.kind, cfg.loss.mode if cfg.loss.kind == "avid" else cfg.loss.agreement,
             len(manifest), world, device, amp_dtype or "fp32", len(loader), start_epoch + 1, cfg.optim.epochs)

    def save(epoch: int, batches_done: int, keep: bool = False) -> str:
        if rank == 0:
            payload = {
                "model": ckpt.strip_module_prefix(_unwrap(net).state_dict()),
                "criterion": criterion.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "batches_done": batches_done,
                "rng": ckpt.rng_state(), "config": cfg.to_dict(),
                "meta": {"time": time.time(), "world_size": world, "num_items": len(manifest)},
            }
            ckpt.save_checkpoint(last_path, payload)
            if keep:
                ckpt.save_checkpoint(os.path.join(run_dir, ckpt.CHECKPOINT_DIR, ckpt.epoch_name(epoch)), payload)
        if world > 1:
            dist.barrier()
        return last_path

    steps, last_loss, interrupted, clips, busy = 0, float("nan"), False, 0, 0.0
    started = time.perf_counter()
    total_batches = len(loader) * (cfg.optim.epochs - start_epoch) - skip_batches
    epoch = start_epoch
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.optim.epochs):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, epoch)
            if hasattr(criterion, "set_epoch"):
                criterion.set_epoch(epoch, progress=cfg.train.progress and rank == 0)
            loader.set_epoch(epoch, skip_batches=skip_batches)
            net.train()
            bar = _progress(len(loader), skip_batches, f"epoch {epoch + 1}/{cfg.optim.epochs}",
                            cfg.train.progress and rank == 0)
            batches_done = skip_batches
            skip_batches = 0
            data_wait = time.perf_counter()
            for batch in loader:
                data_time = time.perf_counter() - data_wait
                t0 = time.perf_counter()
                video = batch["video"].to(device, non_blocking=True)
                audio = batch["audio"].to(device, non_blocking=True)
                index = batch["index"].to(device, non_blocking=True)
                if cfg.train.channels_last:
                    video = video.contiguous(memory_format=torch.channels_last_3d)
                    audio = audio.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                    v, a = net(video, audio)
                loss, logs = criterion(v, a, index)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                steps += 1
                batches_done += 1
                last_loss = float(loss.detach())
                if not math.isfinite(last_loss):
                    save(epoch, batches_done)
                    raise TrainingError(f"loss became {last_loss} at epoch {epoch + 1}, batch {batches_done}; "
                                        "the last checkpoint is kept; try a lower optim.lr or train.precision=fp32")
                step_time = time.perf_counter() - t0
                busy += step_time + data_time
                clips += index.numel() * world
                if bar is not None:
                    bar.update(1)
                    done = steps / max(total_batches, 1)
                    eta = (time.perf_counter() - started) * (1 - done) / max(done, 1e-9)
                    bar.set_postfix(loss=f"{last_loss:.4f}", clips_s=f"{index.numel() * world / (step_time + data_time):.1f}",
                                    run_eta=_hms(eta))
                global_step = int(criterion.step)
                if writer is not None and global_step % cfg.train.log_every == 0:
                    metrics.write(f"{global_step},{epoch + 1},{last_loss:.6f},{optimizer.param_groups[0]['lr']:.6g},"
                                  f"{index.numel() * world / (step_time + data_time):.3f}\n")
                    metrics.flush()
                    for key, value in logs.items():
                        writer.add_scalar(f"train/{key}", float(value), global_step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                    writer.add_scalar("train/clips_per_s", index.numel() * world / (step_time + data_time), global_step)
                    writer.add_scalar("train/data_time_s", data_time, global_step)
                    writer.add_scalar("train/bad_samples", getattr(loader, "bad_samples", 0), global_step)
                if _agreed(stop.raised or (max_steps is not None and steps >= max_steps), world, device):
                    interrupted = stop.raised
                    save(epoch, batches_done)
                    log.info("stopped at epoch %d, batch %d%s; resume with --resume", epoch + 1, batches_done,
                             " (signal)" if interrupted else "")
                    if bar is not None:
                        bar.close()
                    return _finish(run_dir, epoch, steps, last_loss, last_path, interrupted, clips, started,
                                   writer, metrics, log, model, criterion)
                data_wait = time.perf_counter()
            if bar is not None:
                bar.close()
            keep = (epoch + 1) in cfg.train.keep_epochs or epoch + 1 == cfg.optim.epochs
            save(epoch + 1, 0, keep=keep)
            if writer is not None:
                writer.add_scalar("epoch/loss", last_loss, epoch + 1)
                writer.add_scalar("epoch/bad_samples", getattr(loader, "bad_samples", 0), epoch + 1)
            log.info("epoch %d/%d: loss %.4f, %d bad samples, checkpoint %s", epoch + 1, cfg.optim.epochs,
                     last_loss, getattr(loader, "bad_samples", 0), last_path)
    return _finish(run_dir, cfg.optim.epochs, steps, last_loss, last_path, False, clips, started, writer, metrics, log,
                   model, criterion)


def _agreed(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when any rank raised the flag (one all-reduce per step under DDP)."""
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def _finish(run_dir, epochs_done, steps, last_loss, last_path, interrupted, clips, started, writer, metrics,
            log, model, criterion) -> TrainResult:
    elapsed = time.perf_counter() - started
    rate = clips / elapsed if elapsed > 0 else 0.0
    if writer is not None:
        writer.close()
        metrics.close()
    log.info("done: %d steps in %s (%.1f clips/s over all ranks), last loss %.4f, checkpoint %s%s", steps,
             _hms(elapsed), rate, last_loss, last_path, " (interrupted: resume with --resume)" if interrupted else "")
    return TrainResult(run_dir, epochs_done, steps, last_loss, last_path, interrupted, rate, model, criterion)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
