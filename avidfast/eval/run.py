"""The run folder of one evaluation: config, provenance, log, TensorBoard, results.

``runs/eval/<name>/`` (or the config's ``out_dir``) gets ``config.yaml`` and ``meta.json``
(commit, package versions, command, the checkpoint and what was loaded from it), ``eval.log``,
``tb/`` (scalars while training) and ``results.json`` (written atomically, rank 0 only).
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

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

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's (n_r, ...) CPU tensor concatenated in rank order (ranks may hold different n_r)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        parts: List[torch.Tensor] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(parts, tensor)
        return torch.cat(parts)

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
              extra: Dict[str, Any], seed: int = 0) -> EvalRun:
    """Starts the process group under torchrun, picks the device, sets up logging (console and
    ``eval.log``), writes config.yaml / meta.json and opens TensorBoard (rank 0)."""
    from avidfast.eval.data import autocast_dtype, resolve_device
    from avidfast.train.run_folder import setup_logging, write_run_files

    rank, world, _ = init_from_env()
    device = resolve_device(device_name)
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
