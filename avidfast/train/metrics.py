"""The metrics sink of a training run: ``metrics.csv`` and TensorBoard scalars, on rank 0 only.

``metrics.csv`` (columns step, epoch, loss, lr, clips_per_s) is appended to, so a resumed run
continues the file of the run it resumes; the header is written when the file is new. A resumed run
first drops the rows of the steps after its checkpoint (written by the run that stopped or was
killed after it), so that every step has one row, from the run that kept it. TensorBoard
events go to ``<run_dir>/tb``. On other ranks (``enabled=False``) every method does nothing.
"""
import os
from typing import Mapping, Optional

from avidfast.files import atomic_write_text

HEADER = "step,epoch,loss,lr,clips_per_s\n"


class MetricsSink:
    """Per-step rows and scalars every ``log_every`` global steps, per-epoch scalars, closing."""

    def __init__(self, run_dir: str, log_every: int, enabled: bool = True, after_step: Optional[int] = None):
        """after_step: the global step of the checkpoint a resumed run continues from (rows of later
        steps are dropped); None for a new run."""
        self.log_every = log_every
        self.writer = None
        self._csv: Optional[object] = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        path = os.path.join(run_dir, "metrics.csv")
        fresh = not os.path.isfile(path)
        if not fresh and after_step is not None:
            _drop_rows_after(path, after_step)
        self._csv = open(path, "a")
        if fresh:
            self._csv.write(HEADER)

    def step(self, global_step: int, epoch: int, loss: float, lr: float, clips_per_s: float, data_time: float,
             bad_samples: int, logs: Mapping[str, object]) -> None:
        """Records step ``global_step`` of (1-based) ``epoch`` when it falls on ``log_every``:
        a metrics.csv row, then the criterion's logs and lr, clips/s, data wait, bad samples."""
        if self.writer is None or global_step % self.log_every != 0:
            return
        self._csv.write(f"{global_step},{epoch},{loss:.6f},{lr:.6g},{clips_per_s:.3f}\n")
        self._csv.flush()
        for key, value in logs.items():
            self.writer.add_scalar(f"train/{key}", float(value), global_step)
        self.writer.add_scalar("train/lr", lr, global_step)
        self.writer.add_scalar("train/clips_per_s", clips_per_s, global_step)
        self.writer.add_scalar("train/data_time_s", data_time, global_step)
        self.writer.add_scalar("train/bad_samples", bad_samples, global_step)

    def epoch(self, epoch: int, loss: float, bad_samples: int) -> None:
        """The last loss and the bad samples of a finished (1-based) ``epoch``."""
        if self.writer is None:
            return
        self.writer.add_scalar("epoch/loss", loss, epoch)
        self.writer.add_scalar("epoch/bad_samples", bad_samples, epoch)

    def close(self) -> None:
        """Closes the TensorBoard writer and metrics.csv."""
        if self.writer is not None:
            self.writer.close()
            self._csv.close()
            self.writer = self._csv = None


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites metrics.csv without the rows of steps after ``step`` (atomically; untouched when there
    are none)."""
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if line.split(",", 1)[0].isdigit()
                        and int(line.split(",", 1)[0]) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
