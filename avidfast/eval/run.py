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
    run = start_run(run_dir, cfg.to_dict(), cfg.run.device, cfg.run.precision,
                    {"checkpoint": pretrained.info, "protocol": cfg.protocol}, cfg.seed, overwrite=overwrite)
    try:
        result = runner(cfg, pretrained.model.video, run)
    except AvidfastError:
        run.abandon()
        raise
    what = "random-init" if random_init else "trained"
    table = f"{cfg.name} ({what} {checkpoint})\n{result.format()}"
    run.finish({"protocol": cfg.protocol, "checkpoint": pretrained.info, **result.to_dict()}, table)
    return result
