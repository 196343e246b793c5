"""avidfast checkpoints on disk: one atomic save, one safe load, the RNG state, run-folder names.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only:
``model`` (state dict, no ``module.`` prefix), ``criterion`` (banks, Z, step, positives),
``optimizer``, ``scaler``, ``epoch`` (the epoch in progress or finished), ``batches_done`` (batches
of that epoch already trained; 0 after a finished epoch), ``rng`` (torch CPU / CUDA generator
states), ``config`` (the resolved configuration) and ``meta`` (version, commit, time). It is
written with :func:`save_checkpoint` (through :func:`avidfast.files.atomic_write`) and read with
``torch.load(weights_only=True)`` by :func:`load_checkpoint`, which every reader of a checkpoint
file in avidfast goes through (avidfast's own and the paper's released ones).
"""
import errno
import io
import os
import pickle
import random
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from avidfast.errors import AvidfastError
from avidfast.files import atomic_write

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


class CheckpointError(AvidfastError, ValueError):
    """A checkpoint file that cannot be read or used; the message names the file."""


class DamagedCheckpointError(CheckpointError):
    """The file is truncated or corrupt (an interrupted write, copy or download)."""


class UntrustedCheckpointError(CheckpointError):
    """The file holds Python objects that only a full unpickle (which can run code) can read."""


def epoch_name(epoch: int) -> str:
    """File name of the checkpoint kept after ``epoch`` epochs (1-based count)."""
    return f"epoch_{epoch:04d}.pt"


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, a read-only folder); the file it
    would have replaced is unchanged."""


class _WriteErrorRecorder:
    """A binary file whose first failed write (OSError) is remembered: torch.save reports a write the
    file system refused (a full disk) as a RuntimeError about the stream position."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def _save_reporting_os_errors(state: Dict[str, Any], file) -> None:
    """torch.save(state, file), raising the OSError of a refused write instead of torch's RuntimeError."""
    recorder = _WriteErrorRecorder(file)
    try:
        torch.save(state, recorder)
    except RuntimeError:
        if recorder.error is not None:
            raise recorder.error from None
        raise


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Writes state to path atomically (see :func:`avidfast.files.atomic_write`): on any failure
    the partial temporary file is removed and ``path`` keeps its previous content.
    CheckpointWriteError, naming ``path``, when the file system refuses the write (OSError)."""
    try:
        atomic_write(path, lambda f: _save_reporting_os_errors(state, f))
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = "free space on that file system (or point out_dir at a larger one)"
        else:
            hint = "check that the folder is writable"
        kept = "; the file there before is unchanged" if os.path.isfile(path) else ""
        raise CheckpointWriteError(f"checkpoint {path}: could not be written ({reason}){kept}; {hint}") from None


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S*) was not an allowed global")


def _weights_only_reason(error: Exception) -> str:
    """The one line of torch's weights_only refusal that says what it met."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if rest:
            return rest[0].split(". Please")[0]
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _names_no_global(full_path: str) -> bool:
    """True when a GLOBAL that weights_only refused cannot be a real one: a malformed dotted name
    (what a pickle cut inside its GLOBAL line leaves), or a name missing from a module that is
    already imported. Nothing is imported to decide."""
    parts = full_path.split(".")
    if not all(part.isidentifier() for part in parts):
        return True
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is None:
            continue
        value = module
        for attribute in parts[cut:]:
            if not hasattr(value, attribute):
                return True
            value = getattr(value, attribute)
        return False
    return False  # a module not imported here: the file may well name it


def _needs_full_unpickle(error: Exception) -> bool:
    """True when torch.load(weights_only=True) refused an intact file for its Python objects,
    False when the failure shows a damaged file."""
    if not isinstance(error, pickle.UnpicklingError) or "WeightsUnpickler error" not in str(error):
        return False
    match = _UNSUPPORTED_GLOBAL.search(str(error))
    return not (match and _names_no_global(match.group(1)))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].split('. ')[0][:300]}" if text else type(error).__name__


def _damaged(label: str, path: str, error: BaseException) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"{label} {path}: cannot be read: the file is damaged or incomplete "
                                  f"({_first_line(error)}); write, copy or download it again")


def read_checkpoint(path: str, map_location: Any = "cpu", *, trust: bool = False,
                    trust_option: Optional[str] = None, label: str = "checkpoint",
                    data: Optional[bytes] = None) -> Tuple[Any, bool]:
    """(the object saved in ``path``, whether it was read with weights_only=True).

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
    nothing executed. When that refuses the file for the Python objects it holds, it is read fully
    (a full unpickle, which can run code) only with ``trust=True``; otherwise
    UntrustedCheckpointError says so and names ``trust_option`` (how the caller spells trust, e.g.
    ``"--trust"``; None where no such option is offered). A truncated or corrupt file raises
    DamagedCheckpointError, with or without trust. FileNotFoundError when there is no file.
    label: what the file is, for messages ("checkpoint", "reference checkpoint", ...).
    data: the file's bytes, received from another process (avidfast.checkpoints.shared): read
    instead of the file, which this process need not have; ``path`` still names it in messages.
    """
    if data is None and not os.path.isfile(path):
        raise FileNotFoundError(f"{label} {path}: no such file")

    def source():
        return path if data is None else io.BytesIO(data)

    try:
        return torch.load(source(), map_location=map_location, weights_only=True), True
    except (PermissionError, IsADirectoryError) as error:
        raise CheckpointError(f"{label} {path}: cannot be read ({error.strerror})") from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for damaged files
        if not _needs_full_unpickle(error):
            raise _damaged(label, path, error) from None
        refusal = error
    reason = _weights_only_reason(refusal)
    if not trust:
        if trust_option is None:
            raise UntrustedCheckpointError(
                f"{label} {path}: cannot be read with weights_only=True ({reason}); avidfast checkpoints hold only "
                "tensors, numbers, strings, lists and dicts: is it an avidfast checkpoint?") from None
        raise UntrustedCheckpointError(
            f"{label} {path}: cannot be read with weights_only=True ({reason}). Reading it fully unpickles arbitrary "
            f"Python objects, which can run code; if you trust the file's source, pass {trust_option}") from None
    try:
        return torch.load(source(), map_location=map_location, weights_only=False), False
    except (ImportError, AttributeError) as error:
        raise CheckpointError(f"{label} {path}: cannot be read: unpickling it needs Python code that is not "
                              f"available here ({_first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - a damaged file that weights_only stopped early
        raise _damaged(label, path, error) from None


def load_checkpoint(path: str, map_location: Any = "cpu", *, trust: bool = False,
                    trust_option: Optional[str] = None, label: str = "checkpoint", data: Optional[bytes] = None) -> Any:
    """The object saved in ``path`` (or in ``data``, its bytes), read as :func:`read_checkpoint` says."""
    return read_checkpoint(path, map_location, trust=trust, trust_option=trust_option, label=label, data=data)[0]


def non_finite_tensors(state: Mapping[str, Any], parts: Tuple[str, ...] = ("model", "criterion")) -> List[str]:
    """Names ("part.key") of the floating tensors of ``state[part]`` that hold NaN or inf: a
    checkpoint must never be written, resumed or started from with any."""
    names = []
    for part in parts:
        for key, value in (state.get(part) or {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                names.append(f"{part}.{key}")
    return names


def describe_names(names: List[str], shown: int = 3) -> str:
    """'a, b, c and 4 more' for a list of names."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def manifest_record(manifest_path: str, manifest, run_dir: str) -> Dict[str, Any]:
    """What a checkpoint records about the manifest whose row i is its memory slot i, so that the
    run's data can be found and checked again: ``path`` (absolute), ``from_run_dir`` (the path
    relative to the run folder, which survives moving runs and data together), ``root``
    (absolute), ``rows`` and ``fingerprint`` (avidfast.data.manifest.manifest_fingerprint)."""
    from avidfast.data.manifest import manifest_fingerprint

    path = os.path.abspath(manifest_path)
    try:
        from_run_dir = os.path.relpath(path, os.path.abspath(run_dir))
    except ValueError:  # another drive
        from_run_dir = None
    return {"path": path, "from_run_dir": from_run_dir, "root": manifest.root, "rows": len(manifest),
            "fingerprint": manifest_fingerprint(manifest)}


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
