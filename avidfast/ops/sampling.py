"""sample_negatives: counter-based uniform negative indices for memory-bank losses."""
from typing import Optional, Union

import torch

from avidfast.ops._checks import check_sample_negatives
from avidfast.ops._convert import scalar_tensor
from avidfast.ops._extension import OPS, register_fake


def sample_negatives(
    pos: torch.Tensor,
    num_items: int,
    num_negatives: int,
    seed: int,
    step: Union[int, torch.Tensor],
    exclude: Optional[torch.Tensor] = None,
    *,
    row_offset: int = 0,
) -> torch.Tensor:
    """Draw negatives uniformly, with replacement, from {0..num_items-1} minus each row's own index.

    Args:
        pos: (B,) int64, each row's own memory index (never drawn).
        num_items: N, the number of memory slots.
        num_negatives: K draws per row; must be < N - P - 1.
        seed: 64-bit key of the Philox generator.
        step: training step (int or one-element int64 tensor, CPU or pos's device); every
            (seed, step) pair gives a fresh draw, equal pairs give equal draws. Under
            torch.compile pass a tensor (e.g. a step buffer): a Python int is a constant of the
            compiled graph, and a new value recompiles it.
        exclude: optional (B, P) int64, each row sorted ascending: indices that row must never
            draw (e.g. its CMA positives). Duplicates are allowed.
        row_offset: global index of row 0 (rank * local batch under data parallelism), so that
            each rank draws what one process holding the whole batch would draw for those rows.

    Returns:
        (B, K) int64 on pos's device. Draw k of row b depends only on
        (seed, step, row_offset + b, k): CPU and CUDA give identical indices.
    """
    return OPS.sample_negatives(
        pos, num_items, num_negatives, seed, scalar_tensor(step, torch.int64), row_offset, exclude
    )


@register_fake("avidfast::sample_negatives")
def _(pos, num_items, num_negatives, seed, step, row_offset, exclude):
    check_sample_negatives(pos, num_items, num_negatives, step, row_offset, exclude)
    return pos.new_empty((pos.shape[0], num_negatives))
