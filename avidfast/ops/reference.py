"""Plain-PyTorch definitions of what each avidfast operator computes.

These gather, materialise and loop freely: they are the specification the fused kernels are
tested against, not fast code. Arguments and results match avidfast.ops.
"""
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 on (n, 4) counters and a (2,) key (uint32 values); returns (n, 4) uint64."""
    c = [counter[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for round_ in range(10):
        if round_:
            k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK32
            k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK32
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _MASK32]
    return np.stack(c, axis=1)


def uniform_below(seed: int, step: int, row: int, num_draws: int, n: int) -> list:
    """Draws 0..num_draws-1 of `row` at (seed, step): uniform integers in [0, n)."""
    draws = np.arange(num_draws, dtype=np.uint64)
    counter = np.stack(
        [draws >> np.uint64(1), np.full_like(draws, row & 0xFFFFFFFF),
         np.full_like(draws, step & 0xFFFFFFFF), np.full_like(draws, (step >> 32) & 0xFFFFFFFF)],
        axis=1,
    )
    seed &= (1 << 64) - 1
    out = philox4x32_10(counter, np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64))
    result = []
    for k in range(num_draws):
        hi, lo = (out[k, 2], out[k, 3]) if k & 1 else (out[k, 0], out[k, 1])
        bits = (int(hi) << 32) | int(lo)
        result.append((bits * n) >> 64)
    return result


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
    """(B, K) int64: draw k of row b is the r-th allowed index, r = uniform_below(...)."""
    step = int(step)
    rows = []
    for b in range(pos.shape[0]):
        allowed = torch.ones(num_items, dtype=torch.bool)
        allowed[pos[b].cpu()] = False
        if exclude is not None:
            allowed[exclude[b].cpu()] = False
        candidates = allowed.nonzero().squeeze(1)
        r = uniform_below(seed, step, row_offset + b, num_negatives, len(candidates))
        rows.append(candidates[torch.tensor(r, dtype=torch.int64)])
    return torch.stack(rows).to(pos.device) if rows else pos.new_empty((0, num_negatives))


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_scores(
    x: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(B, M) <x[b], memory[idx[b, m]]> / temperature, via an explicit (B, M, D) gather."""
    dtype = _accumulate_dtype(x.dtype)
    gathered = memory[idx].to(dtype)
    return torch.einsum("bd,bmd->bm", x.to(dtype), gathered) / temperature


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
    """The NCE of docs/method.md, term by term: mean over positives plus sum over negatives, per row."""
    if pos_idx.dim() == 1:
        pos_idx = pos_idx.unsqueeze(1)
    dtype = _accumulate_dtype(x.dtype)
    kz = neg_idx.shape[1] * torch.as_tensor(Z, dtype=dtype, device=x.device)
    e_pos = torch.exp(memory_scores(x, memory, pos_idx, temperature))
    e_neg = torch.exp(memory_scores(x, memory, neg_idx, temperature))
    positive = -torch.log(e_pos / (e_pos + kz)).mean(dim=1)
    negative = -torch.log(kz / (e_neg + kz)).sum(dim=1)
    row_loss = positive + negative
    return row_loss.mean() if reduction == "mean" else row_loss


@torch.no_grad()
def memory_update_(
    memory: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, momentum: float
) -> None:
    """memory[i] <- normalize(m memory[i] + (1 - m) x[b]) for b in batch order (in place)."""
    rows = {}
    dtype = _accumulate_dtype(memory.dtype)
    for b, i in enumerate(idx.tolist()):
        old = rows.get(i, memory[i].to(dtype))
        rows[i] = F.normalize(momentum * old + (1 - momentum) * x[b].to(dtype), dim=0, eps=1e-12)
    for i, row in rows.items():
        memory[i] = row.to(memory.dtype)


def cma_topk(
    video_memory: torch.Tensor,
    audio_memory: torch.Tensor,
    k: int,
    mode: str = "consensus",
    queries: Optional[torch.Tensor] = None,
    *,
    precision: str = "highest",
) -> tuple:
    """Full (Q, N) agreement matrix, self masked, stable descending sort, first k columns."""
    rows = torch.arange(video_memory.shape[0]) if queries is None else queries.cpu()
    video, audio = video_memory.float().cpu(), audio_memory.float().cpu()
    sv, sa = video[rows] @ video.T, audio[rows] @ audio.T
    agree = {"consensus": torch.minimum(sv, sa), "union": torch.maximum(sv, sa), "video": sv, "audio": sa}[mode]
    agree[torch.arange(len(rows)), rows] = -float("inf")
    values, indices = torch.sort(agree, dim=1, descending=True, stable=True)
    return values[:, :k].to(video_memory.device), indices[:, :k].to(video_memory.device)
