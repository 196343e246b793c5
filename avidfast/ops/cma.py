"""cma_topk: cross-modal agreement mining, the positive sets of CMA (docs/method.md, CMA)."""
from typing import Optional, Tuple

import torch

from avidfast.ops._checks import AGREEMENTS, check_cma_topk  # AGREEMENTS: the modes, public here
from avidfast.ops._extension import OPS, register_fake


def cma_topk(
    video_memory: torch.Tensor,
    audio_memory: torch.Tensor,
    k: int,
    mode: str = "consensus",
    queries: Optional[torch.Tensor] = None,
    *,
    precision: str = "highest",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each query instance, the k other instances that agree with it most.

    Agreement of i and j, from sv = <V[i], V[j]> and sa = <A[i], A[j]>: "consensus" min(sv, sa)
    (the paper's choice), "union" max(sv, sa), "video" sv, "audio" sa. Computed tile by tile:
    no (Q, N) similarity matrix is ever held; extra memory is O(Q k) plus per-thread tiles.

    Args:
        video_memory, audio_memory: (N, D) contiguous banks of the same dtype (float32,
            bfloat16, float16 or float64) and device; products accumulate in float32.
        k: positives per query, 1 <= k <= N - 2.
        mode: "consensus", "union", "video" or "audio".
        queries: optional (Q,) int64 rows to mine for (default: every row, Q = N), e.g. one
            rank's slice.
        precision: "highest" (float32 products everywhere) or "high" (CUDA may use TF32 tensor
            cores for float32 banks, about 10 mantissa bits; the CPU kernel is unchanged).

    Returns:
        (values, indices): (Q, k) float32 agreements and int64 item indices, each row ordered by
        descending agreement, ties by ascending index; a query never lists itself.
    """
    return OPS.cma_topk(video_memory, audio_memory, int(k), mode, queries, precision)


def sorted_positives(indices: torch.Tensor) -> torch.Tensor:
    """The (Q, k) indices of cma_topk sorted ascending per row: the form `exclude` expects."""
    return torch.sort(indices, dim=1).values


@register_fake("avidfast::cma_topk")
def _(video_memory, audio_memory, k, mode, queries, precision):
    check_cma_topk(video_memory, audio_memory, k, mode, queries, precision)
    rows = video_memory.shape[0] if queries is None else queries.shape[0]
    return (
        video_memory.new_empty((rows, k), dtype=torch.float32),
        video_memory.new_empty((rows, k), dtype=torch.int64),
    )
