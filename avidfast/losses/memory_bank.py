"""MemoryBank: one L2-normalised row per training instance, read and updated by the fused ops."""
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.hugepages import empty_rows
from avidfast.ops import memory_scores, memory_update_, nce_memory_loss

BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The storage dtypes a config (loss.bank_dtype) or a command line chooses by name.
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INIT_CHUNK_ROWS = 65536


def _normal_rows(num_items: int, dim: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Seeded standard-normal rows, L2-normalised, built in chunks to bound temporary memory."""
    rows = empty_rows(num_items, dim, dtype)
    for start in range(0, num_items, _INIT_CHUNK_ROWS):
        stop = min(start + _INIT_CHUNK_ROWS, num_items)
        chunk = torch.randn((stop - start, dim), generator=generator, dtype=torch.float32)
        rows[start:stop] = F.normalize(chunk, dim=1).to(dtype)
    return rows


class MemoryBank(nn.Module):
    """A (num_items, dim) bank of L2-normalised rows, stored in a buffer named `memory`.

    Rows start as a seeded standard normal, normalised (identical on every rank for the same
    seed). Reads go through the fused ops, so no (B, K, dim) gather is ever built.

    Args:
        num_items: N, one row per training instance (video).
        dim: D, embedding size.
        dtype: storage dtype: float32 (default), bfloat16, float16 or float64. Arithmetic is float32.
        seed: seeds the initial rows when `generator` is not given.
        generator: a torch.Generator (CPU) to draw the initial rows from instead of `seed`.
    """

    def __init__(
        self,
        num_items: int,
        dim: int = 128,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        if not isinstance(num_items, int) or num_items < 2:
            raise ValueError(f"num_items must be an int >= 2, got {num_items!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in BANK_DTYPES:
            raise ValueError(f"dtype must be one of {BANK_DTYPES}, got {dtype}")
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        self.register_buffer("memory", _normal_rows(num_items, dim, dtype, generator))

    @property
    def num_items(self) -> int:
        return self.memory.shape[0]

    @property
    def dim(self) -> int:
        return self.memory.shape[1]

    def scores(self, x: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
        """(B, M) scores <x[b], memory[idx[b, m]]> / temperature; see avidfast.ops.memory_scores."""
        return memory_scores(x, self.memory, idx, temperature)

    def nce_loss(
        self,
        x: torch.Tensor,
        pos_idx: torch.Tensor,
        neg_idx: torch.Tensor,
        temperature: float,
        Z: Union[float, torch.Tensor],
        reduction: str = "mean",
    ) -> torch.Tensor:
        """NCE loss of x (B, D) against this bank; see avidfast.ops.nce_memory_loss."""
        return nce_memory_loss(x, self.memory, pos_idx, neg_idx, temperature, Z, reduction=reduction)

    @torch.no_grad()
    def update_(self, idx: torch.Tensor, x: torch.Tensor, momentum: float) -> None:
        """Momentum update of rows idx (B,) with x (B, D); see avidfast.ops.memory_update_."""
        memory_update_(self.memory, idx, x, momentum)

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, dim={self.dim}, dtype={self.memory.dtype}"
