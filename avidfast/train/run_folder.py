"""A run folder: resolved config, provenance (commit, versions, seed, command), logs.

Layout of ``runs/<name>/``: ``config.yaml`` (the resolved configuration), ``meta.json``
(avidfast version, git commit, package versions, seed, world size, command line, host),
``train.log`` (the console log), ``metrics.csv`` (step, epoch, loss, lr, clips/s), ``tb/``
(TensorBoard), ``checkpoints/``.
"""
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Dict

import yaml

from avidfast.files import atomic_write_text


def git_commit() -> str:
    """The commit of the avidfast source tree (with '+dirty' for local edits), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> Dict[str, str]:
    """Versions of the packages a run depends on (missing ones omitted)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("avidfast", "torch", "numpy", "av", "nvidia-dali-cuda130", "tensorboard"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import torch

    out["cuda"] = torch.version.cuda or "none"
    return out


def write_run_files(run_dir: str, config: Dict[str, Any], extra: Dict[str, Any]) -> None:
    """Writes config.yaml and meta.json (atomically) into run_dir."""
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
    meta = {
        "commit": git_commit(),
        "versions": package_versions(),
        "command": " ".join(sys.argv),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **extra,
    }
    atomic_write_text(os.path.join(run_dir, "meta.json"), json.dumps(meta, indent=2) + "\n")


def setup_logging(run_dir: str, rank: int, name: str = "avidfast", log_file: str = "train.log") -> logging.Logger:
    """Console + run_dir/``log_file`` on rank 0; warnings only (console) on other ranks."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        file = logging.FileHandler(os.path.join(run_dir, log_file))
        file.setFormatter(formatter)
        logger.addHandler(file)
    # The data pipelines log bad samples under avidfast.data.*: route them the same way.
    data = logging.getLogger("avidfast.data")
    data.handlers = list(logger.handlers)
    data.propagate = False
    data.setLevel(logging.WARNING)
    return logger
