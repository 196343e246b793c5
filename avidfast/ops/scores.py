"""memory_scores: scaled dot products of embeddings with indexed memory rows, without a gather."""
import torch

from avidfast.ops._checks import check_memory_scores, check_memory_scores_backward
from avidfast.ops._extension import OPS, register_autograd, register_fake


def memory_scores(
    x: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Scores <x[b], memory[idx[b, m]]> / temperature, read in place (no (B, M, D) tensor).

    Args:
        x: (B, D) embeddings, any float dtype; differentiable.
        memory: (N, D) contiguous bank, float32, bfloat16, float16 or float64 (a constant).
        idx: (B, M) int64 row indices into memory.
        temperature: T > 0.

    Returns:
        (B, M) scores in float32 (float64 when x is float64), accumulated in that type.

    Autograd: differentiable in x to any order (the backward pass is memory_scores_backward, whose
    own derivative is memory_scores again), never in memory. The bank is saved for the backward
    pass, so updating it in place (memory_update_) before backward() raises PyTorch's "modified
    by an inplace operation" error; nce_memory_loss, which needs no bank in its backward pass,
    allows that order.
    """
    return OPS.memory_scores(x, memory, idx, float(temperature))


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@register_fake("avidfast::memory_scores")
def _(x, memory, idx, temperature):
    check_memory_scores(x, memory, idx, temperature)
    return x.new_empty(idx.shape, dtype=_accumulate_dtype(x.dtype))


@register_fake("avidfast::memory_scores_backward")
def _(grad_scores, memory, idx, temperature):
    check_memory_scores_backward(grad_scores, memory, idx, temperature)
    return grad_scores.new_empty(
        (idx.shape[0], memory.shape[1]), dtype=_accumulate_dtype(grad_scores.dtype)
    )


def _setup_context(ctx, inputs, output):
    x, memory, idx, temperature = inputs
    ctx.save_for_backward(memory, idx)
    ctx.temperature = temperature
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_scores):
    memory, idx = ctx.saved_tensors
    grad_x = OPS.memory_scores_backward(grad_scores, memory, idx, ctx.temperature)
    return grad_x.to(ctx.x_dtype), None, None, None


register_autograd(
    "avidfast::memory_scores", _backward, setup_context=_setup_context
)


# memory_scores_backward is linear in grad_scores: G -> sum_m G[b, m] memory[idx[b, m]] / T. Its
# derivative (what a second derivative of memory_scores needs) is the adjoint map, memory_scores.
def _setup_context_backward(ctx, inputs, output):
    grad_scores, memory, idx, temperature = inputs
    ctx.save_for_backward(memory, idx)
    ctx.temperature = temperature
    ctx.grad_dtype = grad_scores.dtype


def _backward_of_backward(ctx, grad_grad_x):
    memory, idx = ctx.saved_tensors
    grad = OPS.memory_scores(grad_grad_x, memory, idx, ctx.temperature)
    return grad.to(ctx.grad_dtype), None, None, None


register_autograd(
    "avidfast::memory_scores_backward", _backward_of_backward, setup_context=_setup_context_backward
)
