"""nce_memory_loss: the fused memory-bank NCE loss of AVID/CMA (docs/method.md, AVID loss)."""
from typing import Union

import torch

from avidfast.ops._checks import check_nce_memory_loss
from avidfast.ops._convert import scalar_tensor
from avidfast.ops._extension import OPS, register_autograd, register_fake
from avidfast.ops.scores import _accumulate_dtype


def nce_memory_loss(
    x: torch.Tensor,
    memory: torch.Tensor,
    pos_idx: torch.Tensor,
    neg_idx: torch.Tensor,
    temperature: float,
    Z: Union[float, torch.Tensor],
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """NCE loss of embeddings against memory rows with a frozen partition estimate Z.

    For row b with scores s = <x[b], memory[j]> / T and c = log(K Z):
        L_b = mean_p -log(e^{s_p} / (e^{s_p} + K Z)) + sum_k -log(K Z / (e^{s_k} + K Z)).
    Each memory row is read once: the forward pass also accumulates dL/dx, so backward only
    scales it. Gradients flow into x only.

    Args:
        x: (B, D) embeddings (normally L2-normalised), any float dtype.
        memory: (N, D) contiguous bank, float32, bfloat16, float16 or float64.
        pos_idx: (B, P) int64 positives (or (B,) for one positive per row).
        neg_idx: (B, K) int64 negatives.
        temperature: T > 0.
        Z: partition estimate > 0 (float or one-element tensor on CPU or memory's device).
        reduction: "mean" (scalar, mean over B) or "none" ((B,) per-row losses).

    Returns:
        Scalar (or (B,)) loss in float32 (float64 when x is float64).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if isinstance(pos_idx, torch.Tensor) and pos_idx.dim() == 1:
        pos_idx = pos_idx.unsqueeze(1)
    row_loss, _ = OPS.nce_memory_loss(
        x, memory, pos_idx, neg_idx, float(temperature), scalar_tensor(Z, torch.float64)
    )
    return row_loss.mean() if reduction == "mean" else row_loss


@register_fake("avidfast::nce_memory_loss")
def _(x, memory, pos_idx, neg_idx, temperature, partition):
    check_nce_memory_loss(x, memory, pos_idx, neg_idx, temperature, partition)
    dtype = _accumulate_dtype(x.dtype)
    return x.new_empty((x.shape[0],), dtype=dtype), x.new_empty(x.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    x = inputs[0]
    _, grad_rows = output
    ctx.mark_non_differentiable(grad_rows)
    ctx.save_for_backward(grad_rows)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_loss, _grad_of_grad_rows):
    (grad_rows,) = ctx.saved_tensors
    grad_x = grad_loss.unsqueeze(1) * grad_rows
    return grad_x.to(ctx.x_dtype), None, None, None, None, None


register_autograd(
    "avidfast::nce_memory_loss", _backward, setup_context=_setup_context
)
