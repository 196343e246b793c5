"""nce_memory_loss: the fused memory-bank NCE loss of AVID/CMA (docs/method.md, AVID loss), and
estimate_partition, its partition constant Z from the bank."""
from typing import Optional, Union

import torch

from avidfast.ops._checks import check_nce_memory_loss
from avidfast.ops._convert import scalar_tensor
from avidfast.ops._extension import OPS, register_autograd, register_fake
from avidfast.ops.scores import _accumulate_dtype, memory_scores


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
    scales it. Gradients flow into x only, once: the loss has no second derivative (a backward
    pass with create_graph=True gives a gradient that raises if it is differentiated again).
    Because the bank is not needed after the forward pass, it may be updated in place
    (memory_update_) before backward().

    The Z convention: Z is the *mean* of exp(s) over the noise rows, so that exp(s) is compared
    with K Z (estimate_partition computes it from the bank). lemniscate.pytorch's and CMC's
    NCEAverage keep Z_peer = N x mean(exp s) and compare exp(s) / Z_peer with K / N: the same loss
    with Z = Z_peer / N. Passing a peer's Z unchanged trains a different objective (noise N times
    more likely). Pass Z as a 0-d tensor when it changes between calls under torch.compile: a
    Python float is a constant of the compiled graph, and a new value recompiles it.

    Args:
        x: (B, D) embeddings (normally L2-normalised), any float dtype.
        memory: (N, D) contiguous bank, float32, bfloat16, float16 or float64.
        pos_idx: (B, P) int64 positives (or (B,) for one positive per row).
        neg_idx: (B, K) int64 negatives.
        temperature: T > 0.
        Z: partition estimate > 0, the mean of exp(s) over noise rows (see above): a float or a
            one-element floating tensor on the CPU or memory's device.
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
    # x only links a create_graph=True gradient to x (see differentiable_once); never read.
    ctx.save_for_backward(grad_rows, x)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_loss, _grad_of_grad_rows):
    grad_rows, x = ctx.saved_tensors
    grad_x = (grad_loss.unsqueeze(1) * grad_rows).to(ctx.x_dtype)
    if torch.is_grad_enabled():  # backward(create_graph=True): the result must not be differentiated
        grad_x = differentiable_once(grad_x, x, "nce_memory_loss")
    return grad_x, None, None, None, None, None


def differentiable_once(grad: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """grad (a gradient in x computed by a forward pass), as a tensor whose own derivative raises.

    For backward passes that reuse a gradient computed in the forward pass: with
    create_graph=True their result would silently lack the second derivative. The result is linked
    to x and to grad's own graph through a node that raises when a later backward pass reaches it
    (torch.autograd.function.once_differentiable does the same, but only when the incoming
    gradient requires grad, so that a gradient penalty in x would still come out wrong)."""
    error = torch._C._functions.DelayedError(
        f"{name} has no second derivative: its backward pass reuses the gradient computed by the "
        "forward pass. Differentiate it once (avidfast.ops.reference has plain-PyTorch versions "
        "for higher-order gradients)".encode(), 2)
    carrier = grad if grad.requires_grad else grad.detach().requires_grad_()
    return error(carrier, x)[0]


@torch.no_grad()
def estimate_partition(
    x: torch.Tensor,
    memory: torch.Tensor,
    neg_idx: torch.Tensor,
    temperature: float,
    *,
    pos_idx: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The partition estimate Z of nce_memory_loss from the bank: the mean of exp(<x[b], memory[j]> / T).

    The mean runs over the rows j of neg_idx (every b, every k), as AVIDLoss, CMALoss and
    MemoryNCE do by default; with pos_idx it also runs over the positives, as lemniscate's and
    CMC's NCEAverage do (their K + 1 scored columns). The result is already in avidfast's
    convention (no division by N needed) and carries no gradient. Sums in float64. Under
    torch.distributed, average the ranks' results weighted by their counts (MemoryNCE does).

    Args:
        x: (B, D) embeddings (normalised as they will be in the loss).
        memory: (N, D) bank.
        neg_idx: (B, K) int64 noise rows.
        temperature: T > 0.
        pos_idx: optional (B,) or (B, P) int64 positives to include in the mean.

    Returns:
        0-d float64 tensor on x's device.
    """
    total = memory_scores(x, memory, neg_idx, temperature).exp().sum(dtype=torch.float64)
    count = neg_idx.numel()
    if pos_idx is not None:
        if pos_idx.dim() == 1:
            pos_idx = pos_idx.unsqueeze(1)
        total = total + memory_scores(x, memory, pos_idx, temperature).exp().sum(dtype=torch.float64)
        count += pos_idx.numel()
    return total / count


register_autograd(
    "avidfast::nce_memory_loss", _backward, setup_context=_setup_context
)
