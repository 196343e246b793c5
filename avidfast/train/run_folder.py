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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

import yaml

from avidfast.errors import RunFolderError
from avidfast.files import atomic_write_text

# A training run's results: a new run (without --resume) in a folder holding them is refused.
TRAIN_RESULTS = ("checkpoints",)
# What a run writes before its first checkpoint: left by a start that failed or was killed before
# one, they are replaced by the next run in the folder instead of mixing with it.
TRAIN_LOGS = ("metrics.csv", "tb")


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


def check_writable_folder(path: str, option: str) -> None:
    """RunFolderError naming ``option`` unless ``path`` is a folder this process can write in, or can be
    created as one. Decided by creating (and removing) an empty folder, so nothing is left behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunFolderError(f"{option} {path}: exists and is not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunFolderError(f"{option} {path}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".avidfast-write-check-", dir=existing))
    except OSError as error:
        raise RunFolderError(f"{option} {path}: cannot write in {existing} ({error.strerror or error})") from None


def held_results(run_dir: str, names: Sequence[str]) -> List[str]:
    """The entries of ``names`` that ``run_dir`` holds (a folder counts when it holds a file; shown with
    a trailing /)."""
    found = []
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            if any(files for _, _, files in os.walk(path)):
                found.append(name + "/")
        elif os.path.lexists(path):
            found.append(name)
    return found


def clear_results(run_dir: str, names: Sequence[str]) -> None:
    """Deletes the entries of ``names`` from ``run_dir`` (an explicit overwrite); other files stay."""
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def replace_stale_logs(run_dir: str) -> List[str]:
    """Deletes the :data:`TRAIN_LOGS` of an earlier start that wrote no checkpoint (call it only for a
    new run in a folder without :data:`TRAIN_RESULTS`); returns what it deleted."""
    stale = held_results(run_dir, TRAIN_LOGS)
    clear_results(run_dir, TRAIN_LOGS)
    return stale


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
