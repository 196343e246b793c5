"""memory_update_: in-place momentum update and renormalisation of memory rows."""
import torch

from avidfast.ops._checks import check_memory_update
from avidfast.ops._extension import OPS, register_fake


def memory_update_(
    memory: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, momentum: float
) -> None:
    """memory[idx[b]] <- normalize(momentum * memory[idx[b]] + (1 - momentum) * x[b]), in place.

    Repeated indices are applied in batch order, each on the result of the previous one, in
    float32 (float64 for a float64 bank) and rounded to the bank's dtype once at the end; the
    result is deterministic. Normalisation divides by max(||row||, 1e-12).

    Args:
        memory: (N, D) contiguous bank, float32, bfloat16, float16 or float64; modified in place.
        idx: (B,) int64 rows to update.
        x: (B, D) new embeddings, any float dtype (no gradient flows).
        momentum: m in [0, 1].
    """
    OPS.memory_update_(memory, idx, x.detach(), float(momentum))


@register_fake("avidfast::memory_update_")
def _(memory, idx, x, momentum):
    check_memory_update(memory, idx, x, momentum)
    return None
