"""Where a training run starts and where its checkpoints go, on one process or many nodes.

- :func:`previous_state`: the checkpoint a run continues from. ``resume`` is ``"never"`` (a new
  run: refused in a folder that holds one), ``"always"`` (``--resume``: refused without one) or
  ``"auto"`` (``--resume auto``: continue when the run folder holds a checkpoint, else start; what
  torchrun's restarts need). Rank 0 decides, from its own folder; every rank reads rank 0's file,
  received over the process group when its node has no copy (avidfast.checkpoints.shared).
- Step checkpoints (``train.checkpoint_every`` optimiser steps): ``checkpoints/step_NNNNNNNNN.pt``,
  with ``last.pt`` made the same file (a hard link, or a copy where links are refused); only the
  newest ``train.keep_step_checkpoints`` step files are kept.
"""
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional, Union

from avidfast.checkpoints import store as ckpt
from avidfast.checkpoints.shared import exists_on_rank0, read_on_every_rank
from avidfast.distributed import fail_together, is_distributed
from avidfast.errors import TrainingError
from avidfast.files import atomic_write
from avidfast.train.run_folder import TRAIN_RESULTS, held_results

RESUME_MODES = ("never", "always", "auto")
_STEP_FILE = re.compile(r"^step_(\d{9})\.pt$")


def resume_mode(resume: Union[bool, str]) -> str:
    """One of :data:`RESUME_MODES` for train()'s ``resume`` (False / True / "auto" / a mode)."""
    if resume is True:
        return "always"
    if resume is False or resume is None:
        return "never"
    if resume not in RESUME_MODES:
        raise ValueError(f"resume must be True, False or one of {', '.join(RESUME_MODES)}, got {resume!r}")
    return resume


def _rank() -> int:
    if not is_distributed():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def previous_state(run_dir: str, last_path: str, resume: Union[bool, str]) -> Optional[Dict[str, Any]]:
    """The checkpoint to continue from, or None for a new run (see the module docstring).

    TrainingError (the same on every rank) for ``always`` without a checkpoint, for a new run in a
    folder that holds one (or other results of an earlier run), and for a checkpoint holding NaN / inf.
    """
    mode = resume_mode(resume)
    exists = exists_on_rank0(last_path)
    error = None
    if mode == "always" and not exists:
        error = TrainingError(f"--resume: no checkpoint at {last_path}; start without --resume (or with "
                              "--resume auto)")
    elif mode == "never" and exists:
        error = TrainingError(f"{run_dir} already holds a run ({last_path}); pass --resume to continue it, "
                              "or choose another --set out_dir=... / name=...")
    elif mode != "always" and not exists and _rank() == 0:
        earlier = held_results(run_dir, TRAIN_RESULTS)
        if earlier:
            error = TrainingError(f"{run_dir} holds {', '.join(earlier)} of an earlier run, but no {ckpt.LAST} to "
                                  "resume from; a new run would write over them: choose another --set out_dir=... / "
                                  "name=...")
    fail_together(error)
    if not exists:
        return None
    state = read_on_every_rank(last_path, lambda data: ckpt.load_checkpoint(last_path, data=data), "--resume")
    bad = ckpt.non_finite_tensors(state)
    if bad:
        raise TrainingError(f"--resume: {last_path} holds NaN / inf values ({ckpt.describe_names(bad)}) and "
                            "cannot be continued; copy a finite checkpoint of the run (checkpoints/epoch_NNNN.pt "
                            "or step_NNNNNNNNN.pt) over it, or start a new run")
    return state


def read_start_checkpoint(path: str, label: str) -> Dict[str, Any]:
    """The checkpoint a run starts from (``label``: the option naming it, e.g. loss.init_from): rank
    0's file on every rank."""
    return read_on_every_rank(path, lambda data: ckpt.load_checkpoint(path, label=label, data=data), label)


def step_name(step: int) -> str:
    """File name of the checkpoint written after optimiser step ``step`` (the loss's global step)."""
    return f"step_{step:09d}.pt"


def step_checkpoints(folder: str) -> List[str]:
    """The step checkpoints in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if _STEP_FILE.match(name))


def save_step_checkpoint(folder: str, step: int, last_path: str, write: Callable[[str], None], keep: int) -> str:
    """Writes ``write(path)`` as ``folder/step_NNNNNNNNN.pt``, makes ``last_path`` the same file (an
    atomic hard link; a copy where the file system refuses links), then deletes all but the newest
    ``keep`` step checkpoints. Returns the step file's path."""
    path = os.path.join(folder, step_name(step))
    write(path)
    try:
        _replace_with_link(path, last_path)
    except OSError as error:
        raise ckpt.CheckpointWriteError(f"checkpoint {last_path}: could not be made the same file as {path} "
                                        f"({error.strerror or error}); {path} itself is complete") from None
    for name in step_checkpoints(folder)[:-keep]:
        os.unlink(os.path.join(folder, name))
    return path


def _replace_with_link(source: str, target: str) -> None:
    """``target`` becomes ``source``'s content atomically: a hard link renamed over it, or a copy."""
    temporary = f"{target}.link-{os.getpid()}"
    try:
        os.link(source, temporary)
    except OSError:
        def copy(f):
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f)

        atomic_write(target, copy)
        return
    try:
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
