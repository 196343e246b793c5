"""check_errors: report the bad values the CUDA kernels found (csrc/ops/device_errors.h).

On CUDA tensors the operators check index ranges, Z > 0, step >= 0 and the order of `exclude`
inside the kernels, without a host sync (a sync per check would stall every training step and
forbid CUDA-graph capture). A kernel that meets a bad value skips what it would have read (NaN
score or loss, a bank row left alone) and records the value; the next avidfast call on a CUDA
tensor raises ValueError for it, and so does check_errors(), which waits for the devices first.
AVIDFAST_SYNC_CHECKS=1 checks on the host at the call itself (one sync per check, for
debugging); AVIDFAST_CHECK_INDICES=0 turns the checks on CUDA off. CPU tensors are always checked
on the host, at the call.
"""
from avidfast.ops._extension import LOAD_ERROR


def check_errors() -> None:
    """Raise ValueError for a bad value an earlier CUDA call of an avidfast operator met.

    Synchronises every device an operator has run on (call it where the training loop syncs
    anyway, e.g. when it logs the loss), then raises for the first value recorded since the last
    report (which clears it). Does nothing when nothing was recorded, or without the compiled
    operators.
    """
    if LOAD_ERROR is not None:
        return
    from avidfast import _C

    message = _C._take_device_error(True)
    if message:
        raise ValueError(message)
