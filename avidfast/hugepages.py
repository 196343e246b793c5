"""Transparent huge pages for large CPU tensors that are read at random (memory banks).

Every bank read lands on a random row, so with 4 KiB pages nearly every row costs a TLB miss
(a page walk, much dearer under virtualisation). Advising the kernel to back the bank with 2 MiB
pages before it is first written removes most of them. Where huge pages are unavailable
(another OS, THP disabled) this is a no-op.
"""
import ctypes
import os
import sys

import torch

_MADV_HUGEPAGE = 14
_MIN_BYTES = 4 * 2**20


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Asks Linux to back `tensor`'s (not yet touched) pages with huge pages; True if accepted."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.nbytes < _MIN_BYTES:
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0


def empty_rows(num_items: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (num_items, dim) CPU tensor, advised for huge pages before first use."""
    rows = torch.empty((num_items, dim), dtype=dtype)
    advise_huge_pages(rows)
    return rows
