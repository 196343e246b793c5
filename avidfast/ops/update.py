"""memory_update_: in-place momentum update and renormalisation of memory rows."""
import math
import os

import torch
import torch.nn.functional as F

from avidfast.ops._checks import check_memory_update
from avidfast.ops._extension import OPS, register_fake

# How repeated indices in one call are applied (docs/method.md, "Repeated indices").
DUPLICATES = ("sequential", "last")
# What happens to a row of x that holds a NaN or an infinity.
NONFINITE = ("raise", "skip", "write")
# Set to 1 to make nonfinite="raise" check CUDA batches too, at the cost of a device-to-host copy
# (a synchronisation) per call.
CHECK_FINITE_ENV = "AVIDFAST_CHECK_FINITE"


def memory_update_(
    memory: torch.Tensor,
    idx: torch.Tensor,
    x: torch.Tensor,
    momentum: float,
    *,
    duplicates: str = "sequential",
    nonfinite: str = "raise",
) -> None:
    """memory[idx[b]] <- normalize(momentum * memory[idx[b]] + (1 - momentum) * x[b]), in place.

    Arithmetic is float32 (float64 for a float64 bank), rounded to the bank's dtype once per row;
    normalisation divides by max(||row||, 1e-12). The result is deterministic.

    Like PyTorch's own in-place operators, the call bumps memory's version counter (a backward
    pass whose graph saved the bank before the update raises "modified by an inplace operation"
    instead of using the new rows; memory_scores saves the bank, nce_memory_loss does not), and
    while grad mode is on it refuses a bank that requires grad (an nn.Parameter): update under
    torch.no_grad(), or keep the bank in a buffer. No gradient flows into x.

    Repeated indices (``duplicates``):
      * "sequential" (default): the rows of one slot are applied in batch order, each on the
        result of the previous one: slot i with x then y becomes
        normalize(m * normalize(m * M[i] + (1 - m) x) + (1 - m) y). This is AVID's rule.
      * "last": one write per slot, computed from the *old* row and the slot's last row in the
        batch: normalize(m * M[i] + (1 - m) y), what lemniscate's, CMC's and other
        index_select / index_copy_ updates give on a CPU (their CUDA result is whichever write
        lands last; this one is deterministic). Costs a (B, D) gather and a sort in plain PyTorch.
    Without repeated indices both give the same result.

    Rows of x that hold a NaN or an infinity (``nonfinite``):
      * "raise" (default): ValueError naming the first such batch row and its memory index;
        nothing is written. Checked on every CPU call. On CUDA the check would need the device's
        answer on the host (a synchronisation per call), so by default the rows are dropped on the
        device instead, as with "skip", and no error is raised; set AVIDFAST_CHECK_FINITE=1 to
        check and raise on CUDA too (a debugging aid: one sync per call). Under torch.compile on a
        CPU the check is a runtime assertion (RuntimeError, without the row).
      * "skip": those rows are not applied; the other rows are. On a CPU the slot is left exactly
        as it was; on CUDA (and under torch.compile) the row is applied as a zero vector, which
        leaves the slot as it was up to one renormalisation (a few float32 ulps; with momentum 0
        the slot keeps the row it had before the call).
      * "write": no check; NaN reaches the bank (what a plain index_copy_ update does).

    Args:
        memory: (N, D) contiguous bank, float32, bfloat16, float16 or float64; modified in place.
        idx: (B,) int64 rows to update, on memory's device.
        x: (B, D) new embeddings, any float dtype, on memory's device (no gradient flows).
        momentum: m in [0, 1].
        duplicates: "sequential" (default) or "last", see above.
        nonfinite: "raise" (default), "skip" or "write", see above.
    """
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    x = x.detach()
    momentum = float(momentum)
    if duplicates == "last" and not torch.compiler.is_compiling():
        # Before any computation on the arguments (traced calls: the fake kernel checks them).
        check_memory_update(memory, idx, x, momentum)
    if nonfinite != "write":
        idx, x = _finite_rows(memory, idx, x, momentum, nonfinite)
    if duplicates == "last":
        _update_last_(memory, idx, x, momentum)
    else:
        OPS.memory_update_(memory, idx, x, momentum)


def _finite_rows(memory, idx, x, momentum, nonfinite):
    """(idx, x) with the rows of x that hold NaN or inf removed (exactly: eager CPU) or made
    inert (a zero row: CUDA, torch.compile, meta), or ValueError for nonfinite="raise"."""
    if x.device != memory.device or idx.device != memory.device:
        return idx, x  # the operator's checks name the misplaced argument
    compiling = torch.compiler.is_compiling()
    host_check = memory.device.type == "cpu" or (
        memory.device.type == "cuda" and os.environ.get(CHECK_FINITE_ENV, "0") not in ("", "0"))
    if host_check and not compiling:
        # A finite sum proves every element finite (NaN and inf propagate); one pass, the common
        # case. A non-finite sum may also be an overflow: then look at the rows.
        if math.isfinite(float(x.sum())):
            return idx, x
        check_memory_update(memory, idx, x, momentum)  # shapes and dtypes, before reading rows
        finite = torch.isfinite(x).all(dim=1)
        if bool(finite.all()):
            return idx, x
        if nonfinite == "raise":
            raise ValueError(_nonfinite_message(idx, finite))
        if memory.device.type == "cpu":
            return idx[finite], x[finite]
    finite = torch.isfinite(x).all(dim=1)
    if nonfinite == "raise" and compiling and memory.device.type == "cpu":
        torch._assert_async(finite.all(), "memory_update_: a row of x holds NaN or inf; nothing was "
                                          "written (run eagerly to see which row)")
    if momentum == 0:
        # A zero row would replace the slot by 0 / 1e-12: keep the slot's row instead.
        inert = memory.index_select(0, idx).to(x.dtype)
    else:
        inert = torch.zeros((), dtype=x.dtype, device=x.device)
    return idx, torch.where(finite.unsqueeze(1), x, inert)


def _nonfinite_message(idx: torch.Tensor, finite: torch.Tensor) -> str:
    bad = (~finite).nonzero().squeeze(1).tolist()
    first = bad[0]
    listed = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return (
        f"memory_update_: row {first} of x (memory index {int(idx[first])}) holds NaN or inf "
        f"({len(bad)} such row{'s' if len(bad) > 1 else ''}: {listed}); nothing was written. Pass "
        "nonfinite='skip' to update the other rows, or find where the embedding overflows"
    )


def _update_last_(memory: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, momentum: float) -> None:
    """duplicates="last": every slot gets normalize(m * old row + (1 - m) * its last x), one write."""
    _check_index_range(idx, memory.shape[0])
    acc = torch.float64 if memory.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        last = _last_occurrence(idx)
        mixed = momentum * memory.index_select(0, idx).to(acc) + (1 - momentum) * x.index_select(0, last).to(acc)
        rows = F.normalize(mixed, dim=1, eps=1e-12).to(memory.dtype)
    # Every occurrence of a slot writes the same row, so the order of the writes does not matter.
    # Outside no_grad, so that index_copy_ refuses a leaf that requires grad, as the operator does.
    if torch.is_grad_enabled() and memory.requires_grad and not memory.is_leaf:
        raise RuntimeError("memory_update_ has no derivative, but memory requires grad: update it under "
                           "torch.no_grad(), or keep the bank in a buffer that does not require grad")
    memory.index_copy_(0, idx, rows)


def _last_occurrence(idx: torch.Tensor) -> torch.Tensor:
    """(B,) int64: for each b, the largest b' with idx[b'] == idx[b] (no host synchronisation)."""
    batch = idx.shape[0]
    order = torch.sort(idx, stable=True).indices
    ordered = idx.index_select(0, order)
    run_end = torch.ones(batch, dtype=torch.bool, device=idx.device)
    run_end[:-1] = ordered[1:] != ordered[:-1]
    position = torch.arange(batch, device=idx.device)
    # For each sorted position, the end of its run: the first run end at or after it.
    ends = torch.where(run_end, position, torch.full_like(position, batch))
    ends = ends.flip(0).cummin(0).values.flip(0)
    last = torch.empty_like(idx)
    last[order] = order.index_select(0, ends)
    return last


def _check_index_range(idx: torch.Tensor, num_items: int) -> None:
    """The kernels' index range check (CUDA: unless AVIDFAST_CHECK_INDICES=0, as in checks.cpp)."""
    if idx.numel() == 0 or torch.compiler.is_compiling() or idx.device.type == "meta":
        return
    if idx.device.type != "cpu" and os.environ.get("AVIDFAST_CHECK_INDICES") == "0":
        return
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= num_items:
        raise ValueError(f"idx must lie in [0, {num_items}) (the memory's rows), but holds values in "
                         f"[{low}, {high}]")


@register_fake("avidfast::memory_update_")
def _(memory, idx, x, momentum):
    check_memory_update(memory, idx, x, momentum)
    return None
