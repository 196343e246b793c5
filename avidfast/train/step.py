"""The training step: one batch through the networks, the loss, backward and the optimiser.

:class:`TrainStep` is what :func:`avidfast.train.loop.train` calls for every batch and what
``avidfast bench train`` times (avidfast.bench.train_suite): inputs to the device (and to
channels-last when asked), the forward pass under autocast, the criterion (its bank update
staged, not applied: ``commit=False``), then zero_grad and ``scaler.scale(loss).backward()``.
Then the finiteness check: the loss and (without a GradScaler) the gradients, agreed over the
ranks with one all-reduce. Only a finite step commits the criterion's update (banks, Z, step)
and runs ``scaler.step`` and ``scaler.update``; a non-finite one applies nothing and says where
it was (:class:`StepResult`). The GradScaler is enabled for float16 autocast only (otherwise it
passes the loss and the optimiser step through unchanged); it keeps its own handling of inf / NaN
in the scaled gradients (the optimiser step is skipped and the scale lowered; the loss being
finite, the banks are updated), reported as ``scaler_skipped``.
"""
import contextlib
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of train.precision on ``device`` (None: float32, no autocast).

    "auto" is bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on the CPU.
    """
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def to_channels_last(model: torch.nn.Module) -> None:
    """Puts an AVModel's weights in the layouts TrainStep(channels_last=True) feeds it:
    channels_last_3d for the video network, channels_last for the audio network."""
    model.video.to(memory_format=torch.channels_last_3d)
    model.audio.to(memory_format=torch.channels_last)


class StepResult(NamedTuple):
    """What one step returns: the loss (a detached scalar tensor, on the device), the criterion's
    logs (scalar tensors), the number of clips of this process's batch; ``applied``: False when
    the step was not finite and nothing was changed (weights, optimiser, banks, Z, step), with
    ``problem`` saying what and on which ranks; ``scaler_skipped``: the float16 GradScaler found
    inf / NaN in the scaled gradients and skipped the optimiser step (banks updated)."""

    loss: torch.Tensor
    logs: Dict[str, torch.Tensor]
    batch_size: int
    applied: bool = True
    problem: Optional[str] = None
    scaler_skipped: bool = False


class TrainStep:
    """One optimiser step of ``net`` (an AVModel, possibly under DDP / torch.compile) on a batch.

    Args:
        net: called as ``net(video, audio)``, returns the (video, audio) embeddings.
        criterion: AVIDLoss / CMALoss, called as ``criterion(v, a, index)`` -> (loss, logs).
        optimizer, scaler: the optimiser and its torch.amp.GradScaler.
        device: where inputs go (``non_blocking`` copies).
        amp_dtype: autocast dtype of the forward pass (see :func:`autocast_dtype`); None: float32.
        channels_last: convert the clips to channels_last_3d / channels_last (the model's weights
            should be converted once with :func:`to_channels_last`).
        restore_buffers: when a step is not applied, put the network's buffers (BatchNorm running
            statistics) back as they were before its forward pass (a copy per step: for runs that
            skip non-finite steps and go on).
    """

    def __init__(self, net, criterion, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                 restore_buffers: bool = False):
        self.net, self.criterion, self.optimizer, self.scaler = net, criterion, optimizer, scaler
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.restore_buffers = restore_buffers

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> StepResult:
        """Trains on ``batch`` (the batch contract: "video", "audio", "index")."""
        video = batch["video"].to(self.device, non_blocking=True)
        audio = batch["audio"].to(self.device, non_blocking=True)
        index = batch["index"].to(self.device, non_blocking=True)
        if self.channels_last:
            video = video.contiguous(memory_format=torch.channels_last_3d)
            audio = audio.contiguous(memory_format=torch.channels_last)
        buffers = list(self.net.buffers()) if self.restore_buffers else []
        saved = [b.detach().clone() for b in buffers]
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext():
            v, a = self.net(video, audio)
        loss, logs = self.criterion(v, a, index, commit=False)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        problem = self._non_finite(loss.detach())
        if problem is None and not self.criterion.commit():
            problem = "non-finite embeddings or partition estimates Z (all ranks)"
        elif problem is not None:
            self.criterion.discard()
        if problem is not None:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, copy in zip(buffers, saved):
                    buffer.copy_(copy)
            return StepResult(loss.detach(), logs, index.numel(), applied=False, problem=problem)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = scale is not None and self.scaler.get_scale() < scale
        return StepResult(loss.detach(), logs, index.numel(), scaler_skipped=skipped)

    def _non_finite(self, loss: torch.Tensor) -> Optional[str]:
        """None when the loss (and, without a GradScaler, every gradient) is finite on every rank;
        else what was not, and where. One all-reduce of two flags per rank under torch.distributed."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        flags = torch.zeros(2 * world, dtype=torch.float32, device=loss.device)
        flags[2 * rank] = (~torch.isfinite(loss)).to(torch.float32)
        if not self.scaler.is_enabled():  # the GradScaler checks the (scaled) gradients itself
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            flags[2 * rank + 1] = non_finite_gradients(params).to(device=loss.device, dtype=torch.float32)
        if distributed:
            dist.all_reduce(flags)
        bad = flags.view(world, 2).tolist()
        if not any(any(row) for row in bad):
            return None
        loss_ranks = [r for r in range(world) if bad[r][0]]
        grad_ranks = [r for r in range(world) if bad[r][1]]
        value = f" ({float(loss):g})" if rank in loss_ranks else ""
        if loss_ranks == grad_ranks:
            return f"non-finite loss{value} and gradients on {_ranks(loss_ranks)}"
        parts = [f"non-finite loss{value} on {_ranks(loss_ranks)}"] if loss_ranks else []
        parts += [f"non-finite gradients on {_ranks(grad_ranks)}"] if grad_ranks else []
        return " and ".join(parts)


def _ranks(ranks: Sequence[int]) -> str:
    return ("ranks " if len(ranks) > 1 else "rank ") + ", ".join(map(str, ranks))


def non_finite_gradients(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A one-element tensor, 1 when any gradient of ``params`` holds NaN or inf, else 0.

    One fused pass per (device, dtype) group: the multi-tensor check GradScaler uses, with an
    unscale factor of 1 (which leaves every gradient bit-for-bit as it was).
    """
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    found = torch.zeros(1, dtype=torch.float32)
    for (device, _), grads in groups.items():
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, torch.ones(1, device=device))
        except (AttributeError, NotImplementedError, RuntimeError):  # dtypes or devices the fused check lacks
            flag = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().to(torch.float32).reshape(1)
        found = torch.maximum(found.to(device), flag)
    return found
