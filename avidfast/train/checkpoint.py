"""Checkpoints: one file per save, written atomically, readable with torch.load(weights_only=True).

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only:
``model`` (state dict, no ``module.`` prefix), ``criterion`` (banks, Z, step, positives),
``optimizer``, ``scaler``, ``epoch`` (the epoch in progress or finished), ``batches_done`` (batches
of that epoch already trained; 0 after a finished epoch), ``rng`` (torch CPU / CUDA generator
states), ``config`` (the resolved configuration) and ``meta`` (version, commit, time).
"""
import os
import random
import tempfile
from typing import Any, Dict, Optional

import torch

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


def epoch_name(epoch: int) -> str:
    """File name of the checkpoint kept after ``epoch`` epochs (1-based count)."""
    return f"epoch_{epoch:04d}.pt"


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Writes state to path atomically (temporary file in the same folder, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint` (weights_only=True)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt or foreign files
        raise ValueError(f"checkpoint {path}: cannot be read with weights_only=True ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); is it an avidfast checkpoint?") from None


def rng_state() -> Dict[str, Any]:
    """Torch CPU and CUDA generator states and Python's, in weights_only-loadable types."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured (CUDA states only when devices are present)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Removes DDP's / torch.compile's ``module.`` / ``_orig_mod.`` prefixes from keys."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The run's last.pt if it exists."""
    path = os.path.join(run_dir, CHECKPOINT_DIR, LAST)
    return path if os.path.isfile(path) else None
