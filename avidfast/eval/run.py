"""The run folder of one evaluation: config, provenance, log, TensorBoard, results.

``runs/eval/<name>/`` (``runs/eval/<name>-random/`` for a ``random_init`` baseline; or the config's
``out_dir``) gets ``config.yaml`` and ``meta.json`` (commit, package versions, command, the checkpoint
and what was loaded from it), ``eval.log``, ``tb/`` (scalars while training) and ``results.json``
(written atomically, rank 0 only). A folder that already holds an evaluation is refused, before
anything is written, unless ``overwrite`` (which first deletes that evaluation's files).

:func:`run_config_protocol` is the library entry point of the config-driven protocols (``linear``,
``finetune``): from an :class:`~avidfast.eval.config.EvalConfig` and a checkpoint to results.json.
Under torchrun every process reads its share of the clips; scores are gathered with
:func:`avidfast.distributed.all_gather_rows`.
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from avidfast.distributed import fail_together, init_from_env
from avidfast.errors import AvidfastError, RunFolderError
from avidfast.files import atomic_write_text

log = logging.getLogger("avidfast")

# The files of an evaluation run folder (finetuned.pt: `eval finetune`'s weights).
EVAL_RUN_FILES = ("results.json", "config.yaml", "meta.json", "eval.log", "tb", "finetuned.pt")
RANDOM_SUFFIX = "-random"


def default_run_dir(name: str, random_init: bool = False) -> str:
    """``runs/eval/<name>``, or ``runs/eval/<name>-random`` for the random-init baseline, so that the
    baseline never lands in the trained network's folder."""
    return os.path.join("runs", "eval", name + (RANDOM_SUFFIX if random_init else ""))


def check_run_dir(run_dir: str, overwrite: bool, elsewhere: str) -> List[str]:
    """The evaluation files (:data:`EVAL_RUN_FILES`) ``run_dir`` holds, which ``overwrite`` allows
    replacing; RunFolderError when the folder cannot be written, or holds an evaluation and not
    ``overwrite``. ``elsewhere``: how the caller chooses another folder, for the message."""
    from avidfast.train.run_folder import check_writable_folder, held_results

    check_writable_folder(run_dir, "run folder")
    held = held_results(run_dir, EVAL_RUN_FILES)
    if held and not overwrite:
        raise RunFolderError(f"{run_dir} already holds an evaluation ({', '.join(held)}); pass --overwrite to "
                             f"replace it, or choose another folder with {elsewhere}")
    return held


@dataclass
class EvalRun:
    """Where and how one evaluation runs: folder, process rank / world size, device, autocast
    dtype (``None``: fp32), and a TensorBoard writer on rank 0 (``None`` elsewhere)."""

    run_dir: str
    rank: int
    world: int
    device: torch.device
    autocast: Optional[torch.dtype]
    writer: Optional[Any]
    made_dir: bool = False  # the run folder did not exist before this run

    def abandon(self) -> None:
        """After a failed run (an AvidfastError: a mistake in its inputs), removes what it wrote, so that
        the folder does not look like it holds an evaluation: closes TensorBoard and eval.log and, on
        rank 0, deletes the run's files (:data:`EVAL_RUN_FILES`) and the folder if this run made it."""
        from avidfast.train.run_folder import clear_results

        if self.writer is not None:
            self.writer.close()
            self.writer = None
        inside = os.path.abspath(self.run_dir) + os.sep
        for name in ("avidfast", "avidfast.data"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if isinstance(handler, logging.FileHandler) and os.path.abspath(handler.baseFilename).startswith(inside):
                    logger.removeHandler(handler)
                    handler.close()
        if self.rank == 0:
            clear_results(self.run_dir, EVAL_RUN_FILES)
            if self.made_dir:
                try:
                    os.rmdir(self.run_dir)
                except OSError:  # it holds something else now
                    pass

    def scalar(self, tag: str, value: float, step: int) -> None:
        """A TensorBoard scalar (rank 0)."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def finish(self, results: Dict[str, Any], table: str) -> str:
        """Writes results.json and prints ``table`` (rank 0); closes TensorBoard. Returns the path."""
        path = os.path.join(self.run_dir, "results.json")
        if self.rank == 0:
            atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")
            print(table)
            print(f"results: {path}")
        if self.writer is not None:
            self.writer.close()
        return path


def start_run(run_dir: str, config: Dict[str, Any], device_name: str, precision: str,
              extra: Dict[str, Any], seed: int = 0, device_option: str = "run.device", *, overwrite: bool = False,
              elsewhere: str = "--set name=... or --set out_dir=...") -> EvalRun:
    """Starts the process group under torchrun, picks the device, checks the run folder
    (:func:`check_run_dir`: refused when it holds an evaluation, unless ``overwrite``; ``elsewhere``
    says how to choose another), sets up logging (console and ``eval.log``), writes config.yaml /
    meta.json and opens TensorBoard (rank 0). An unusable ``device_name`` raises EvalError naming
    ``device_option`` (:func:`~avidfast.eval.data.resolve_device`)."""
    from avidfast.distributed import barrier
    from avidfast.eval.data import autocast_dtype, resolve_device
    from avidfast.train.run_folder import setup_logging, write_run_files

    rank, world, _ = init_from_env()
    device = resolve_device(device_name, device_option)
    held = check_run_dir(run_dir, overwrite, elsewhere)
    made_dir = not os.path.isdir(run_dir)
    barrier()  # every rank has checked the folder before rank 0 changes it
    if held and rank == 0:
        from avidfast.train.run_folder import clear_results

        clear_results(run_dir, EVAL_RUN_FILES)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    setup_logging(run_dir, rank, log_file="eval.log")
    writer = None
    if rank == 0:
        write_run_files(run_dir, config, dict(extra, seed=seed, world_size=world, device=str(device)))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tb"))
    torch.manual_seed(seed)
    return EvalRun(run_dir, rank, world, device, autocast_dtype(precision, device), writer, made_dir)


def _check_manifests(cfg) -> None:
    """Reads cfg.data's manifests before the run folder is started: ManifestError for a missing or
    unlabelled one, or one whose files are not where its paths point (data.root)."""
    from avidfast.data.manifest import check_files_exist
    from avidfast.eval.data import labelled_split

    split = labelled_split(cfg)
    check_files_exist(split.train, f"data.train_manifest {cfg.data.train_manifest}", "--set data.root")
    check_files_exist(split.test, f"data.test_manifest {cfg.data.test_manifest or cfg.data.train_manifest}",
                      "--set data.root")


def run_config_protocol(cfg, checkpoint: str, *, random_init: bool = False, trust: bool = False,
                        overwrite: bool = False):
    """Runs the config-driven protocol ``cfg.protocol`` (``linear``: :func:`~avidfast.eval.linear_protocol.
    run_linear_eval`; ``finetune``: :func:`~avidfast.eval.finetune.run_finetune`) on the video encoder of
    ``checkpoint`` (an avidfast or reference checkpoint; ``random_init``: the same architecture with fresh
    weights; ``trust``: allow a full unpickle of a reference file).

    Starts the run folder (``cfg.out_dir``, else :func:`default_run_dir`: ``runs/eval/<name>``, with
    ``-random`` for ``random_init``; a folder holding an evaluation is refused unless ``overwrite``),
    writes results.json and prints the table (rank 0). Returns
    the protocol's result (``format()``, ``to_dict()``). Mistakes in the inputs raise AvidfastError
    subclasses naming them (ConfigError, ManifestError, PretrainedError, EvalError, TooManyBadSamples).
    """
    from avidfast.eval.finetune import run_finetune
    from avidfast.eval.linear_protocol import run_linear_eval
    from avidfast.checkpoints.pretrained import load_pretrained

    runner = {"linear": run_linear_eval, "finetune": run_finetune}[cfg.protocol]
    init_from_env()  # under torchrun: the checkpoint is read from rank 0 where a node has no copy
    failure = None
    try:
        _check_manifests(cfg)
    except AvidfastError as error:
        failure = error
    fail_together(failure)
    pretrained = load_pretrained(checkpoint, random_init=random_init, seed=cfg.seed, trust=trust)
    run_dir = cfg.out_dir or default_run_dir(cfg.name, random_init)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the batch must divide before a folder is made
    per_process = cfg.per_process_batch(world)
    run = start_run(run_dir, cfg.to_dict(), cfg.run.device, cfg.run.precision,
                    {"checkpoint": pretrained.info, "protocol": cfg.protocol, "batch_size_per_process": per_process,
                     "global_batch_size": per_process * world}, cfg.seed, overwrite=overwrite)
    try:
        result = runner(cfg, pretrained.model.video, run)
    except AvidfastError:
        run.abandon()
        raise
    what = "random-init" if random_init else "trained"
    table = f"{cfg.name} ({what} {checkpoint})\n{result.format()}"
    run.finish({"protocol": cfg.protocol, "checkpoint": pretrained.info, **result.to_dict()}, table)
    return result


FOLD_FIELD = "{fold}"


def fold_config(cfg, fold: int):
    """``cfg`` for one fold: ``{fold}`` in data.train_manifest / data.test_manifest replaced by the fold
    number, out_dir ``<run folder>/fold-<N>``, name ``<name>-fold<N>``. ConfigError when neither
    manifest holds ``{fold}`` (every fold would read the same split)."""
    import copy

    from avidfast.config import ConfigError

    manifests = (cfg.data.train_manifest or "", cfg.data.test_manifest or "")
    if not any(FOLD_FIELD in m for m in manifests):
        raise ConfigError(f"--folds: data.train_manifest ({manifests[0]}) and data.test_manifest ({manifests[1] or None}) "
                          "do not contain {fold}; name the fold's lists with it, e.g. --set "
                          "data.train_manifest=ucf101/train{fold}.csv --set data.test_manifest=ucf101/test{fold}.csv")
    out = copy.deepcopy(cfg)
    out.data.train_manifest = cfg.data.train_manifest.replace(FOLD_FIELD, str(fold))
    if cfg.data.test_manifest:
        out.data.test_manifest = cfg.data.test_manifest.replace(FOLD_FIELD, str(fold))
    out.name = f"{cfg.name}-fold{fold}"
    return out


def fold_summary(results: Dict[int, Dict[str, Any]], keys=("clip_top1", "video_top1")) -> Dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for one fold) over folds of each accuracy in ``keys``
    (fraction per fold; a dict of fractions per block for the linear probe)."""
    import statistics

    def spread(values: List[float]) -> Dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    out: Dict[str, Any] = {}
    folds = sorted(results)
    for key in keys:
        first = results[folds[0]][key]
        if isinstance(first, dict):
            out[key] = {b: spread([results[f][key][b] for f in folds]) for b in first}
        else:
            out[key] = spread([results[f][key] for f in folds])
    return out


def run_folds(cfg, checkpoint: str, folds: List[int], *, random_init: bool = False, trust: bool = False,
              overwrite: bool = False) -> Dict[str, Any]:
    """:func:`run_config_protocol` once per fold (:func:`fold_config`: ``{fold}`` in the manifests, the run
    in ``<run folder>/fold-<N>``), then ``<run folder>/results.json`` with every fold's clip / video top-1
    and their mean and standard deviation (:func:`fold_summary`). Returns that dict."""
    from avidfast.distributed import init_from_env

    if not folds or len(set(folds)) != len(folds) or any(f < 1 for f in folds):
        from avidfast.config import ConfigError

        raise ConfigError(f"--folds: give distinct fold numbers from 1, e.g. --folds 1 2 3; got {folds}")
    base = cfg.out_dir or default_run_dir(cfg.name, random_init)
    configs = {f: fold_config(cfg, f) for f in folds}  # every fold's manifests are checked before the first runs
    for f, fold_cfg in configs.items():
        fold_cfg.out_dir = os.path.join(base, f"fold-{f}")
        _check_manifests(fold_cfg)
        check_run_dir(fold_cfg.out_dir, overwrite, "--set out_dir=...")
    summary_path = os.path.join(base, "results.json")
    if os.path.exists(summary_path) and not overwrite:
        raise RunFolderError(f"{base} already holds a fold summary (results.json); pass --overwrite to replace it, "
                             "or choose another folder with --set out_dir=...")
    per_fold: Dict[int, Dict[str, Any]] = {}
    for f, fold_cfg in configs.items():
        result = run_config_protocol(fold_cfg, checkpoint, random_init=random_init, trust=trust, overwrite=overwrite)
        per_fold[f] = result.to_dict()
    keep = ("clip_top1", "video_top1", "num_test_videos", "num_excluded_test_videos")
    summary = {"protocol": cfg.protocol, "checkpoint": checkpoint, "folds": folds,
               "per_fold": {str(f): {k: per_fold[f].get(k) for k in keep} for f in folds},
               **fold_summary(per_fold),
               "runs": {str(f): os.path.join(base, f"fold-{f}") for f in folds}}
    rank, _, _ = init_from_env()
    if rank == 0:
        atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str) + "\n")
        print(format_fold_summary(summary))
        print(f"fold summary: {summary_path}")
    return summary


def format_fold_summary(summary: Dict[str, Any]) -> str:
    """One line per fold and the mean +- std (percent) of clip and video top-1 (per block for probes)."""
    def pct(value) -> str:
        if isinstance(value, dict) and "mean" in value:
            return f"{100 * value['mean']:.2f} +- {100 * value['std']:.2f}"
        if isinstance(value, dict):
            return ", ".join(f"{b} {pct(v)}" for b, v in value.items())
        return f"{100 * value:.2f}"

    lines = [f"{summary['protocol']} over folds {summary['folds']}:"]
    for f, row in summary["per_fold"].items():
        lines.append(f"  fold {f}: clip top-1 {pct(row['clip_top1'])}, video top-1 {pct(row['video_top1'])} "
                     f"({row['num_test_videos']} test videos)")
    lines.append(f"  mean +- std: clip top-1 {pct(summary['clip_top1'])}, video top-1 {pct(summary['video_top1'])}")
    return "\n".join(lines)
