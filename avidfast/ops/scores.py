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
