"""torch.distributed helpers: process-group start-up under torchrun, and the collectives the losses,
the evaluation protocols and the checkpoint exchange need, as no-ops when torch.distributed is not
initialised. :func:`fail_together` turns an error of one rank into the same error on every rank,
so that no rank waits in a collective for a peer that has stopped."""
import datetime
import os
import socket
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from avidfast.errors import RankFailedError

# torch's own default for gloo and NCCL collectives: how long a rank waits for its peers
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class BatchLayout:
    """Sizes of every rank's local batch, in rank order, and this rank's place among them."""

    sizes: List[int]
    rank: int

    @classmethod
    def exchange(cls, local_size: int, device: torch.device) -> "BatchLayout":
        """All-gathers the local batch sizes (a one-element tensor per rank)."""
        if not is_distributed():
            return cls([local_size], 0)
        mine = torch.tensor([local_size], dtype=torch.int64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        return cls([int(s) for s in torch.cat(everyone).tolist()], dist.get_rank())

    @property
    def offset(self) -> int:
        """Global index of this rank's first row."""
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def all_gather(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Concatenates each tensor's rows from every rank in rank order (no autograd)."""
        if len(self.sizes) == 1:
            return [t.detach() for t in tensors]
        largest = max(self.sizes)
        gathered = []
        for t in tensors:
            t = t.detach().contiguous()
            padded = t.new_zeros((largest,) + t.shape[1:])
            padded[: t.shape[0]] = t
            parts = [torch.empty_like(padded) for _ in self.sizes]
            dist.all_gather(parts, padded)
            gathered.append(torch.cat([p[:n] for p, n in zip(parts, self.sizes)]))
        return gathered


def collective_device() -> torch.device:
    """Where this process group's collectives take their tensors: the current CUDA device under NCCL,
    else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Each tensor's rows from every rank, concatenated in rank order, on every rank (no autograd).

    The ranks may hold different numbers of rows; the tensors of one rank all hold the same number
    (rows of one table: scores, their video index, their label). Each result is on its input's
    device (the collective itself runs on :func:`collective_device`). Without a process group: the
    tensors themselves, detached.
    """
    if not tensors:
        return []
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise ValueError(f"all_gather_rows needs tensors with the same number of rows, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    if not is_distributed():
        return [t.detach() for t in tensors]
    device = collective_device()
    layout = BatchLayout.exchange(rows, device)
    gathered = layout.all_gather([t.to(device) for t in tensors])
    return [g.to(t.device) for g, t in zip(gathered, tensors)]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t over all ranks (t itself when not distributed)."""
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    """Waits until every rank gets here (nothing to wait for without a process group of several ranks)."""
    if is_distributed():
        dist.barrier()


def init_from_env(timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> Tuple[int, int, int]:
    """(rank, world size, local rank); under torchrun (WORLD_SIZE > 1) initialises the process
    group first: NCCL when CUDA is visible (each process on cuda:LOCAL_RANK), else gloo. Every
    collective of the group gives up after ``timeout_s`` seconds (an error, not a hang) when a
    peer does not join it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def fail_together(error: Optional[BaseException]) -> None:
    """Raises the same RankFailedError on every rank when any rank passes an error; returns when
    none does. Call it on every rank at the same point (one all-gather of short strings): the
    message names the first failing rank, its host and its error, so every rank stops with one
    clear message instead of waiting for a peer that has stopped. Without a process group:
    re-raises ``error`` itself."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    mine = None if error is None else f"{error}"
    everyone: List[Optional[Tuple[str, str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, None if mine is None else (socket.gethostname(), mine))
    failed = [(rank, report) for rank, report in enumerate(everyone) if report is not None]
    if not failed:
        return
    rank, (host, message) = failed[0]
    others = [str(r) for r, _ in failed[1:]]
    others = f" (and rank{'s' if len(others) > 1 else ''} {', '.join(others)})" if others else ""
    raise RankFailedError(f"rank {rank} of {dist.get_world_size()} (host {host}){others}: {message}; every rank "
                          "stopped") from (error if error is not None else None)


def broadcast_bytes(data: Optional[bytes], src: int = 0) -> bytes:
    """``data`` of rank ``src`` on every rank (the others pass None): a length, then the bytes as a
    uint8 tensor on :func:`collective_device`. Without a process group: ``data`` itself."""
    if not is_distributed():
        return data if data is not None else b""
    device = collective_device()
    sending = dist.get_rank() == src
    length = torch.tensor([len(data) if sending else 0], dtype=torch.int64, device=device)
    dist.broadcast(length, src)
    if int(length.item()) == 0:
        return b""
    if sending:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        payload = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src)
    return data if sending else payload.cpu().numpy().tobytes()


def all_gather_strings(text: str) -> List[str]:
    """Every rank's ``text``, in rank order ([text] without a process group)."""
    if not is_distributed():
        return [text]
    everyone: List[str] = [""] * dist.get_world_size()
    dist.all_gather_object(everyone, text)
    return everyone
