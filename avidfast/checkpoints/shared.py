"""Reading one checkpoint on every rank without assuming a shared file system.

Rank 0 writes the checkpoints, on its own disk; a torchrun job over several nodes may give every
node its own working folder. :func:`read_on_every_rank` makes rank 0's file the one every rank
reads: each rank hashes its own copy of the path (if it has one), the hashes are all-gathered, and
the ranks whose copy is missing or differs from rank 0's receive rank 0's bytes over the process
group (one broadcast); ranks whose copy matches read it from their own disk. Without a process
group it reads the file.
"""
import hashlib
import logging
import os
from typing import Callable, Optional, TypeVar

from avidfast.distributed import all_gather_strings, broadcast_bytes, fail_together, is_distributed

T = TypeVar("T")
log = logging.getLogger("avidfast")


def file_digest(path: str) -> str:
    """SHA-256 of the file at ``path`` ("" when there is none)."""
    if not os.path.isfile(path):
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def exists_on_rank0(path: str) -> bool:
    """Whether rank 0 holds a file at ``path`` (rank 0's answer on every rank)."""
    answers = all_gather_strings("1" if os.path.isfile(path) else "")
    return bool(answers[0])


def read_on_every_rank(path: str, read: Callable[[Optional[bytes]], T], label: str) -> T:
    """``read(data)`` on every rank, for rank 0's file at ``path``.

    ``read`` reads ``path`` itself when given None, or the file's bytes it is given (the bytes of
    rank 0's copy, broadcast to this rank because its own copy is missing or differs). A rank 0
    without the file raises the same FileNotFoundError (as a RankFailedError) on every rank;
    ``label`` names the file in messages and the log ("--resume", "loss.init_from", ...).
    """
    if not is_distributed():
        return read(None)
    digests = all_gather_strings(file_digest(path))
    error = None if digests[0] else FileNotFoundError(f"{label} {path}: no such file on rank 0")
    fail_together(error)
    missing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    data = None
    if missing:
        import torch.distributed as dist

        rank = dist.get_rank()
        sent = broadcast_bytes(_file_bytes(path) if rank == 0 else None)
        if rank in missing:
            data = sent
            what = "has no copy" if not digests[rank] else "has another copy"
            log.warning("%s %s: this rank (%d) %s; read rank 0's (%d bytes, sent over the process group)", label,
                        path, rank, what, len(sent))
    result, error = None, None
    try:
        result = read(data)
    except Exception as failure:  # noqa: BLE001 - every rank must learn of it, whatever it is
        error = failure
    fail_together(error)
    return result


def _file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
