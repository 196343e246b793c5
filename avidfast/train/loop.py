"""The training loop: AVID or CMA pre-training on one CPU, one GPU or many (torchrun).

One process per GPU (or one CPU process per torchrun rank): the encoders are wrapped in
DistributedDataParallel, the loss all-gathers embeddings to update identical banks on every
rank, rank 0 writes logs and checkpoints. Each epoch reads ``samples_per_epoch`` clips in total
across ranks (Table 3's "es"). A checkpoint is written after every epoch and on SIGTERM / Ctrl-C
(mid-epoch, with the position reached); ``resume`` continues from it exactly.

Nothing non-finite is ever kept: a step whose loss or gradients are NaN / inf changes nothing
(TrainStep) and stops the run (``train.non_finite=stop``) or is skipped and counted (``skip``);
no checkpoint is written from a state that holds NaN / inf, and none is resumed or started from.
Work that cannot make a step (an epoch shorter than a batch) is a ConfigError before anything is
written. A checkpoint records its manifest (path, fingerprint of its rows: memory slot i is row i),
and ``--resume`` / ``loss.init_from`` refuse one trained on other rows unless
``train.allow_manifest_change``.

:func:`train` reads as the run goes: the previous state (resume), the run folder, the starting
model and criterion (:func:`_starting_point`: fresh, a reference checkpoint, CMA from AVID, or
the resumed run), devices and wrappers, then one :func:`_train_epoch` per epoch. The step itself
is avidfast.train.step.TrainStep; metrics.csv and TensorBoard are avidfast.train.metrics.
"""
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from avidfast.checkpoints import store as ckpt
from avidfast.checkpoints.build import build_criterion, build_model, load_reference_init, load_weights
from avidfast.config import Config
from avidfast.distributed import fail_together, init_from_env
from avidfast.errors import AvidfastError, TrainingError
from avidfast.ops import check_errors
from avidfast.train.audio_stats import training_stats_path
from avidfast.train.metrics import MetricsSink
from avidfast.train.resume import previous_state, read_start_checkpoint, save_step_checkpoint
from avidfast.train.run_folder import check_writable_folder, replace_stale_logs, setup_logging, write_run_files
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
    skipped_steps: int = 0  # non-finite steps skipped in this call (train.non_finite=skip)
    scaler_skipped: int = 0  # float16: optimiser steps the GradScaler skipped in this call
    signal: Optional[int] = None  # the signal that interrupted it (signal.SIGTERM or signal.SIGINT)


class _StopFlag:
    """Set by SIGTERM / SIGINT; training saves and returns at the next batch boundary."""

    def __init__(self):
        self.raised = False
        self.signum: Optional[int] = None
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
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _shard_index(cfg: Config, manifest):
    """The index of cfg.data.shards, checked to hold exactly the manifest's memory slots."""
    from avidfast.data.manifest import manifest_fingerprint
    from avidfast.data.shards.index import ShardError, read_index

    try:
        index = read_index(cfg.data.shards)
    except ShardError as error:
        raise TrainingError(f"data.shards: {error}") from None
    if index.fingerprint != manifest_fingerprint(manifest) or len(index) != len(manifest):
        raise TrainingError(f"data.shards={cfg.data.shards} was not written from data.manifest={cfg.data.manifest} "
                            f"({len(index)} samples, {len(manifest)} rows, or other videos in the slots): write the "
                            "shards from that manifest (`avidfast prepare ... --shards`) or point data.manifest at "
                            "the one they came from")
    if cfg.optim.samples_per_epoch is not None:
        raise TrainingError("data.shards reads every sample once per epoch: leave optim.samples_per_epoch unset")
    return index


def build_loader(cfg: Config, manifest, rank: int, world: int, device: torch.device):
    """The CPU or DALI training loader of cfg.data (from cfg.data.shards when set)."""
    from avidfast.data.audio import AudioJitter, SpectrogramStats, get_preset

    video = cfg.data.video.to_video_config()
    a = cfg.data.audio
    preset = get_preset(a.preset)
    jitter = AudioJitter(volume=tuple(a.volume), max_offset=a.max_offset, duration=tuple(a.duration))
    stats = SpectrogramStats.load(a.stats, preset) if a.stats else None
    shards = _shard_index(cfg, manifest) if cfg.data.shards else None
    if cfg.data.pipeline == "dali":
        from avidfast.data.dali_pipeline import build_dali_loader

        if device.type != "cuda":
            raise TrainingError("data.pipeline=dali needs a GPU; use --set data.pipeline=cpu on this machine")
        return build_dali_loader(
            shards if shards is not None else manifest, video=video, audio_preset=preset, stats=stats,
            batch_size=cfg.per_process_batch(world),
            mode="train", seed=cfg.seed, rank=rank, world_size=world, device_id=device.index or 0,
            num_threads=max(1, cfg.data.workers), jitter=jitter, samples_per_epoch=cfg.optim.samples_per_epoch,
            max_bad_fraction=cfg.data.max_bad_fraction,
        )
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader

    if shards is not None:
        from avidfast.data.shards.dataset import ShardClipDataset

        dataset = ShardClipDataset(shards, video=video, audio_preset=preset, stats=stats, mode="train", jitter=jitter,
                                   seed=cfg.seed, classes=manifest.classes)
    else:
        dataset = ClipDataset(manifest, video=video, audio_preset=preset, stats=stats, mode="train", jitter=jitter,
                              seed=cfg.seed)
    return CPULoader(dataset, batch_size=cfg.per_process_batch(world), workers=cfg.data.workers, rank=rank,
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
    manifest: Dict[str, Any]  # the checkpoints' meta["manifest"] (ckpt.manifest_record)
    kept: Optional[str] = None  # the last checkpoint written (or resumed from), in words
    skipped_steps: int = 0  # non-finite steps skipped over the whole run (resumes included)
    saved_at: Optional[Tuple[int, int]] = None  # (epoch, batches_done) of the last checkpoint this call wrote

    def save(self, epoch: int, batches_done: int, keep: bool = False, step: Optional[int] = None) -> str:
        """Writes last.pt (and epoch_NNNN.pt when ``keep``; step_NNNNNNNNN.pt, linked as last.pt,
        for a step checkpoint after optimiser step ``step``) on rank 0; every rank waits for it.

        TrainingError, writing nothing, when the weights or the criterion's state hold NaN / inf
        (checked on every rank and agreed, so that all ranks stop together). A write the file
        system refuses (a full disk) raises CheckpointWriteError naming the file on every rank
        (RankFailedError under torchrun); the previous checkpoint is left as it was."""
        model_state = ckpt.strip_module_prefix(_unwrap(self.net).state_dict())
        bad = ckpt.non_finite_tensors({"model": model_state, "criterion": self.criterion.state_dict()})
        if _agreed(bool(bad), self.world, self.device):
            where = ckpt.describe_names(bad) if bad else "another rank's state"
            raise TrainingError(f"the state at {_position(epoch, batches_done)} holds NaN / inf values ({where}), "
                                f"so no checkpoint was written; {self.kept_words()}; try a lower optim.lr or "
                                "train.precision=fp32")
        failure = None
        if self.rank == 0:
            payload = {
                "model": model_state,
                "criterion": self.criterion.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "batches_done": batches_done,
                "skipped_steps": self.skipped_steps, "rng": ckpt.rng_state(), "config": self.cfg.to_dict(),
                "meta": {"time": time.time(), "world_size": self.world, "num_items": self.num_items,
                         "manifest": self.manifest},
            }
            folder = os.path.join(self.cfg.run_dir, ckpt.CHECKPOINT_DIR)
            try:
                if step is not None:
                    save_step_checkpoint(folder, step, self.last_path, lambda path: ckpt.save_checkpoint(path, payload),
                                         self.cfg.train.keep_step_checkpoints)
                else:
                    ckpt.save_checkpoint(self.last_path, payload)
                if keep:
                    ckpt.save_checkpoint(os.path.join(folder, ckpt.epoch_name(epoch)), payload)
            except ckpt.CheckpointWriteError as error:
                failure = ckpt.CheckpointWriteError(f"{error}; {self.kept_words()}; resume once it can be written")
        fail_together(failure)  # every rank waits for rank 0's write, and stops with it when it failed
        self.kept = f"{self.last_path} ({_position(epoch, batches_done)})"
        self.saved_at = (epoch, batches_done)
        return self.last_path

    def kept_words(self) -> str:
        """Which checkpoint a stopped run leaves, in words."""
        if self.kept is None:
            return "no checkpoint was written before it"
        return f"the last checkpoint, {self.kept}, is kept as it was"


@dataclass
class _Tally:
    """What this call of :func:`train` has done so far."""

    started: float  # time.perf_counter() when training started
    total_batches: int  # batches this call will train if nothing stops it
    steps: int = 0  # optimiser steps applied
    clips: int = 0  # over all ranks
    last_loss: float = float("nan")  # of the last applied step
    interrupted: bool = False  # stopped by SIGTERM / SIGINT
    signal: Optional[int] = None  # which
    skipped: int = 0  # non-finite steps skipped (train.non_finite=skip)
    skipped_in_a_row: int = 0
    scaler_skipped: int = 0  # float16: optimiser steps the GradScaler skipped (inf / NaN in scaled gradients)


def train(cfg: Config, *, resume: Union[bool, str] = False, max_steps: Optional[int] = None,
          trust_reference: bool = False) -> TrainResult:
    """Runs (or resumes) the training of ``cfg``; returns what was done.

    resume: False (a new run), True (continue from the run folder's last checkpoint) or "auto"
    (continue when there is one, else start: avidfast.train.resume). max_steps stops after that
    many batches in this call (optimiser steps, and non-finite steps skipped with
    train.non_finite=skip), with a mid-epoch checkpoint as on SIGTERM: used by tests and for quick
    trials. TrainingError when a step is not finite (train.non_finite=stop), when a checkpoint would
    hold NaN / inf, or when the run's previous checkpoint (resume) or its starting checkpoint
    (loss.init_from) holds NaN / inf or belongs to other manifest rows. trust_reference lets
    cfg.loss.init_from_reference be read beyond weights_only (see load_reference_checkpoint).
    Under torchrun, an input that fails on one rank (its manifest, its data folder) stops every
    rank with the same RankFailedError before any training collective.
    """
    from avidfast.data.manifest import check_files_exist, read_manifest

    if not cfg.data.manifest:
        raise TrainingError("data.manifest is not set: --set data.manifest=PATH (a CSV from `avidfast prepare`)")
    rank, world, local_rank = init_from_env(cfg.train.collective_timeout)
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    last_path = os.path.join(cfg.run_dir, ckpt.CHECKPOINT_DIR, ckpt.LAST)
    # ConfigErrors and TrainingErrors before anything is written to run_dir: every input (checkpoints,
    # statistics, the loader) is read and checked first, then the run folder is written. This rank's
    # own inputs first, agreed over the ranks before the first collective that reads a checkpoint.
    failure, manifest = None, None
    try:
        check_writable_folder(cfg.run_dir, "out_dir")
        manifest = read_manifest(cfg.data.manifest, cfg.data.root)
        check_files_exist(manifest, f"data.manifest {cfg.data.manifest}", "--set data.root")
        cfg.check_num_items(len(manifest))
        cfg.check_epoch_size(len(manifest), world)
    except (AvidfastError, OSError) as error:
        failure = error
    fail_together(failure)
    state = previous_state(cfg.run_dir, last_path, resume)
    record = ckpt.manifest_record(cfg.data.manifest, manifest, cfg.run_dir)
    if state is not None:
        _check_same_manifest(cfg, state, record, "--resume", last_path)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    model, criterion, notes = _starting_point(cfg, len(manifest), record, state, trust_reference, device)
    model = _place(model, cfg, world, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, skip_batches = 0, 0
    if state is not None:
        start_epoch, skip_batches = _restore(state, model, criterion, optimizer, scaler, last_path, cfg)
        notes.append(f"resumed from {last_path}: epoch {start_epoch}, {skip_batches} batches done")
    net = _wrap(model, cfg, world, local_rank, device)
    cfg.data.audio.stats = training_stats_path(cfg, manifest, rank)  # recorded in the run's config
    loader = build_loader(cfg, manifest, rank, world, device)
    stale = replace_stale_logs(cfg.run_dir) if state is None and rank == 0 else []
    log = setup_logging(cfg.run_dir, rank)
    if rank == 0:
        write_run_files(cfg.run_dir, cfg.to_dict(), {"seed": cfg.seed, "world_size": world,
                                                     "resumed": state is not None, "num_items": len(manifest),
                                                     "manifest": record,
                                                     "batch_size_per_process": cfg.per_process_batch(world),
                                                     "global_batch_size": cfg.per_process_batch(world) * world})
    for note in notes:
        log.info("%s", note)
    if stale:
        log.warning("replaced %s of an earlier start in %s that wrote no checkpoint", ", ".join(stale), cfg.run_dir)
    step = TrainStep(net, criterion, optimizer, scaler, device, amp_dtype, cfg.train.channels_last,
                     restore_buffers=cfg.train.non_finite == "skip")
    run = _Run(cfg, rank, world, device, last_path, len(manifest), model, net, criterion, optimizer, scaler, loader,
               step, MetricsSink(cfg.run_dir, cfg.train.log_every, enabled=rank == 0,
                                 after_step=None if state is None else int(state["criterion"]["step"])), log, record)
    if state is not None:
        run.kept = f"{last_path} ({_position(start_epoch, skip_batches)})"
        run.skipped_steps = int(state.get("skipped_steps", 0))
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


def _position(epoch: int, batches_done: int) -> str:
    """Where a checkpoint of (epoch, batches_done) stands, in words."""
    return f"end of epoch {epoch}" if batches_done == 0 else f"epoch {epoch + 1}, batch {batches_done}"


def _check_same_manifest(cfg: Config, state: Dict, record: Dict[str, Any], option: str, path: str) -> None:
    """TrainingError when the checkpoint ``state`` (read for ``option``) was trained on other
    manifest rows than ``record``'s: its memory slot i would then stand for another video. A
    different number of rows is always refused; other rows of the same number unless
    train.allow_manifest_change. Checkpoints without a record are checked by their row count."""
    meta = state.get("meta") or {}
    theirs = meta.get("manifest") or {}
    rows = theirs.get("rows", meta.get("num_items"))
    if rows is not None and int(rows) != record["rows"]:
        raise TrainingError(f"{option} {path}: its memory banks have {rows} slots (the rows of "
                            f"{theirs.get('path', 'its training manifest')}), but data.manifest {cfg.data.manifest} "
                            f"has {record['rows']} rows; use the manifest the checkpoint was trained on")
    fingerprint = theirs.get("fingerprint")
    if fingerprint is None or fingerprint == record["fingerprint"] or cfg.train.allow_manifest_change:
        return
    raise TrainingError(f"{option} {path}: it was trained on the manifest {theirs.get('path')} (rows fingerprint "
                        f"{fingerprint[:12]}), but data.manifest {cfg.data.manifest} lists other videos or another "
                        f"order (fingerprint {record['fingerprint'][:12]}), so memory slot i would stand for another "
                        "video; pass the run's manifest, or --set train.allow_manifest_change=true to continue anyway")


def _starting_point(cfg: Config, num_items: int, record: Dict[str, Any], state: Optional[Dict],
                    trust_reference: bool, device: torch.device) -> Tuple[torch.nn.Module, torch.nn.Module, List[str]]:
    """The model (on the CPU) and criterion (on ``device``) training starts from, and what to log.

    fresh: built from cfg.seed. Reference (loss.init_from_reference): weights, and banks and Z
    when the file has them, of a checkpoint of the paper's code. CMA (loss.init_from): the AVID
    run's weights and banks (refused when they hold NaN / inf or come from other manifest rows).
    Resume (``state``): a CMA criterion is built from the resumed banks; everything else is
    restored afterwards by :func:`_restore`.
    """
    model = build_model(cfg)
    init, notes = None, []
    if cfg.loss.init_from_reference and state is None:
        init = load_reference_init(cfg, model, num_items, trust_reference)
        _refuse_non_finite({"model": model.state_dict(), "criterion": (init or {}).get("criterion")},
                           "loss.init_from_reference", cfg.loss.init_from_reference)
        notes.append(f"{'model' if init is None else 'model, banks and Z'} from the reference checkpoint "
                     f"{cfg.loss.init_from_reference}")
    elif cfg.loss.kind == "cma" and state is None:
        init = read_start_checkpoint(cfg.loss.init_from, "loss.init_from")
        _refuse_non_finite(init, "loss.init_from", cfg.loss.init_from)
        _check_same_manifest(cfg, init, record, "loss.init_from", cfg.loss.init_from)
        load_weights(model, ckpt.strip_module_prefix(init["model"]), f"loss.init_from {cfg.loss.init_from}",
                     saved_config=init.get("config"), config=cfg)
        notes.append(f"CMA starts from {cfg.loss.init_from} (epoch {init.get('epoch')})")
    elif cfg.loss.kind == "cma":
        init = {"criterion": state["criterion"]}
    criterion = build_criterion(cfg, num_items, init).to(device)
    if cfg.loss.kind == "cma":
        notes.append(f"positive sets re-mined every {criterion.resample_every} epochs: loss.resample_every="
                     f"{cfg.loss.resample_every} reference epochs of {cfg.loss.reference_epoch_passes} passes over "
                     f"{num_items} rows")
    if cfg.loss.kind == "avid" and init is not None:  # banks and Z of a reference checkpoint
        criterion.load_state_dict(init["criterion"])
    return model, criterion, notes


def _refuse_non_finite(state: Dict, option: str, path: str) -> None:
    bad = ckpt.non_finite_tensors(state)
    if bad:
        raise TrainingError(f"{option} {path}: holds NaN / inf values ({ckpt.describe_names(bad)}); training cannot "
                            "start from it: choose a finite checkpoint (an earlier epoch_NNNN.pt of that run)")


def _place(model: torch.nn.Module, cfg: Config, world: int, device: torch.device) -> torch.nn.Module:
    """The model on ``device``, channels-last and with SyncBatchNorm when the config asks."""
    model = model.to(device)
    if cfg.train.channels_last:
        to_channels_last(model)
    if cfg.train.sync_bn and world > 1:
        if device.type != "cuda":
            raise TrainingError("train.sync_bn needs GPUs (torch's SyncBatchNorm has no CPU / gloo version); "
                                "--set train.sync_bn=false on this machine")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _restore(state: Dict, model, criterion, optimizer, scaler, path: str, cfg: Config) -> Tuple[int, int]:
    """Loads a resumed checkpoint's weights, banks, optimiser, scaler and RNG states; returns
    (epoch to continue, batches of it already done)."""
    load_weights(model, state["model"], f"--resume {path}", saved_config=state.get("config"), config=cfg)
    load_weights(criterion, state["criterion"], f"--resume {path}", what="memory banks and loss state")
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
    applied_before = tally.steps
    data_wait = time.perf_counter()
    for batch in run.loader:
        data_time = time.perf_counter() - data_wait
        t0 = time.perf_counter()
        result = run.step(batch)
        batches_done += 1
        if not result.applied:
            _non_finite_step(run, result, epoch, batches_done, tally)
            if _agreed(stop.raised or (max_steps is not None and tally.steps + tally.skipped >= max_steps),
                       run.world, run.device):
                return _stop_early(run, epoch, batches_done, tally, stop, bar)
            data_wait = time.perf_counter()
            continue
        tally.steps += 1
        tally.skipped_in_a_row = 0
        tally.scaler_skipped += int(result.scaler_skipped)
        tally.last_loss = float(result.loss)
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
        every = cfg.train.checkpoint_every
        if every and int(run.criterion.step) % every == 0 and batches_done < len(run.loader) + skip_batches:
            run.save(epoch, batches_done, step=int(run.criterion.step))  # the epoch's end writes its own
        if _agreed(stop.raised or (max_steps is not None and tally.steps + tally.skipped >= max_steps),
                   run.world, run.device):
            return _stop_early(run, epoch, batches_done, tally, stop, bar)
        data_wait = time.perf_counter()
    if bar is not None:
        bar.close()
    check_errors()  # what the CUDA kernels recorded in the epoch's last step (one sync per epoch)
    if tally.steps == applied_before and batches_done > skip_batches:
        raise TrainingError(f"no step of epoch {epoch + 1} was finite ({batches_done - skip_batches} skipped), so its "
                            f"checkpoint was not written; {run.kept_words()}; try a lower optim.lr or "
                            "train.precision=fp32")
    keep = (epoch + 1) in cfg.train.keep_epochs or epoch + 1 == cfg.optim.epochs
    run.save(epoch + 1, 0, keep=keep)
    run.metrics.epoch(epoch + 1, tally.last_loss, getattr(run.loader, "bad_samples", 0))
    log.info("epoch %d/%d: loss %.4f, %d bad samples, checkpoint %s", epoch + 1, cfg.optim.epochs,
             tally.last_loss, getattr(run.loader, "bad_samples", 0), run.last_path)
    return False


def _stop_early(run: _Run, epoch: int, batches_done: int, tally: _Tally, stop: "_StopFlag", bar) -> bool:
    """A signal or max_steps: a mid-epoch checkpoint, then :func:`_train_epoch` returns True. A signal
    that reached any rank counts as one on every rank (the same exit status everywhere)."""
    tally.interrupted, tally.signal = _agreed(stop.raised, run.world, run.device), stop.signum
    if bar is not None:
        bar.close()
    if run.saved_at != (epoch, batches_done):  # not just written as a step checkpoint
        run.save(epoch, batches_done)
    run.log.info("stopped at epoch %d, batch %d%s; resume with --resume", epoch + 1, batches_done,
                 " (signal)" if tally.interrupted else "")
    return True


def _non_finite_step(run: _Run, result, epoch: int, batches_done: int, tally: _Tally) -> None:
    """A step TrainStep did not apply (NaN / inf): TrainingError (train.non_finite=stop, or too many
    skipped in a row), or a warning and the count (skip). The same decision on every rank."""
    cfg = run.cfg
    check_errors()  # a bad index or Z the CUDA kernels recorded names itself (ValueError) before the NaN does
    where = (f"{result.problem} at step {int(run.criterion.step) + 1} (epoch {epoch + 1}, batch {batches_done}"
             + (f"; reported by rank {run.rank})" if run.world > 1 else ")"))
    if cfg.train.non_finite == "stop":
        raise TrainingError(f"{where}: the step was not applied and nothing was saved after it; {run.kept_words()}; "
                            "try a lower optim.lr or train.precision=fp32, or --set train.non_finite=skip to skip "
                            "such steps")
    tally.skipped += 1
    tally.skipped_in_a_row += 1
    run.skipped_steps += 1
    if tally.skipped_in_a_row > cfg.train.max_skipped_steps:
        raise TrainingError(f"{where}: {tally.skipped_in_a_row} steps in a row were not finite (more than "
                            f"train.max_skipped_steps={cfg.train.max_skipped_steps}); nothing was saved after them; "
                            f"{run.kept_words()}; try a lower optim.lr or train.precision=fp32")
    run.log.warning("%s: step skipped (%d in a row, %d in this run)", where, tally.skipped_in_a_row,
                    run.skipped_steps)


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
    skipped = []
    if tally.skipped:
        skipped.append(f"{tally.skipped} non-finite step(s) skipped")
    if tally.scaler_skipped:
        skipped.append(f"{tally.scaler_skipped} optimiser step(s) skipped by the float16 GradScaler")
    run.log.info("done: %d steps in %s (%.1f clips/s over all ranks), last loss %.4f, checkpoint %s%s%s", tally.steps,
                 _hms(elapsed), rate, tally.last_loss, run.last_path,
                 f" ({'; '.join(skipped)})" if skipped else "",
                 " (interrupted: resume with --resume)" if tally.interrupted else "")
    return TrainResult(run.cfg.run_dir, epochs_done, tally.steps, tally.last_loss, run.last_path, tally.interrupted,
                       rate, run.model, run.criterion, tally.skipped, tally.scaler_skipped, tally.signal)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, leave=False)
