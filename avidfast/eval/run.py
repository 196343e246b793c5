"""The run folder of one evaluation: config, provenance, log, TensorBoard, results.

``runs/eval/<name>/`` (or the config's ``out_dir``) gets ``config.yaml`` and ``meta.json``
(commit, package versions, command, the checkpoint and what was loaded from it), ``eval.log``,
``tb/`` (scalars while training) and ``results.json`` (written atomically, rank 0 only).

:func:`run_config_protocol` is the library entry point of the config-driven protocols (``linear``,
``finetune``): from an :class:`~avidfast.eval.config.EvalConfig` and a checkpoint to results.json.
Under torchrun every process reads its share of the clips; scores are gathered with
:func:`avidfast.distributed.all_gather_rows`.
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from avidfast.distributed import init_from_env
from avidfast.files import atomic_write_text

log = logging.getLogger("avidfast")


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
              extra: Dict[str, Any], seed: int = 0, device_option: str = "run.device") -> EvalRun:
    """Starts the process group under torchrun, picks the device, sets up logging (console and
    ``eval.log``), writes config.yaml / meta.json and opens TensorBoard (rank 0). An unusable
    ``device_name`` raises EvalError naming ``device_option`` (:func:`~avidfast.eval.data.resolve_device`)."""
    from avidfast.eval.data import autocast_dtype, resolve_device
    from avidfast.train.run_folder import setup_logging, write_run_files

    rank, world, _ = init_from_env()
    device = resolve_device(device_name, device_option)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    setup_logging(run_dir, rank, log_file="eval.log")
    writer = None
    if rank == 0:
        write_run_files(run_dir, config, dict(extra, seed=seed, world_size=world, device=str(device)))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tb"))
    torch.manual_seed(seed)
    return EvalRun(run_dir, rank, world, device, autocast_dtype(precision, device), writer)


def run_config_protocol(cfg, checkpoint: str, *, random_init: bool = False, trust: bool = False):
    """Runs the config-driven protocol ``cfg.protocol`` (``linear``: :func:`~avidfast.eval.linear_protocol.
    run_linear_eval`; ``finetune``: :func:`~avidfast.eval.finetune.run_finetune`) on the video encoder of
    ``checkpoint`` (an avidfast or reference checkpoint; ``random_init``: the same architecture with fresh
    weights; ``trust``: allow a full unpickle of a reference file).

    Starts the run folder ``cfg.run_dir``, writes results.json and prints the table (rank 0). Returns
    the protocol's result (``format()``, ``to_dict()``). Mistakes in the inputs raise AvidfastError
    subclasses naming them (ConfigError, ManifestError, PretrainedError, EvalError, TooManyBadSamples).
    """
    from avidfast.eval.finetune import run_finetune
    from avidfast.eval.linear_protocol import run_linear_eval
    from avidfast.checkpoints.pretrained import load_pretrained

    runner = {"linear": run_linear_eval, "finetune": run_finetune}[cfg.protocol]
    pretrained = load_pretrained(checkpoint, random_init=random_init, seed=cfg.seed, trust=trust)
    run = start_run(cfg.run_dir, cfg.to_dict(), cfg.run.device, cfg.run.precision,
                    {"checkpoint": pretrained.info, "protocol": cfg.protocol}, cfg.seed)
    result = runner(cfg, pretrained.model.video, run)
    what = "random-init" if random_init else "trained"
    table = f"{cfg.name} ({what} {checkpoint})\n{result.format()}"
    run.finish({"protocol": cfg.protocol, "checkpoint": pretrained.info, **result.to_dict()}, table)
    return result
