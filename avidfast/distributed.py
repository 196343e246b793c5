"""torch.distributed helpers: process-group start-up under torchrun, and the collectives the losses
and the evaluation protocols need, as no-ops when torch.distributed is not initialised."""
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist


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


def init_from_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank); under torchrun (WORLD_SIZE > 1) initialises the process
    group first: NCCL when CUDA is visible (each process on cuda:LOCAL_RANK), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0
