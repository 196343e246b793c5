"""The training step: one batch through the networks, the loss, backward and the optimiser.

:class:`TrainStep` is what :func:`avidfast.train.loop.train` calls for every batch and what
``avidfast bench train`` times (avidfast.bench.train_suite): inputs to the device (and to
channels-last when asked), the forward pass under autocast, the criterion (which also updates
its memory banks), then zero_grad, ``scaler.scale(loss).backward()``, ``scaler.step`` and
``scaler.update``. The GradScaler is enabled for float16 autocast only; otherwise it passes the
loss and the optimiser step through unchanged.
"""
import contextlib
from typing import Dict, Mapping, NamedTuple, Optional

import torch


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
    logs (scalar tensors) and the number of clips of this process's batch."""

    loss: torch.Tensor
    logs: Dict[str, torch.Tensor]
    batch_size: int


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
    """

    def __init__(self, net, criterion, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False):
        self.net, self.criterion, self.optimizer, self.scaler = net, criterion, optimizer, scaler
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> StepResult:
        """Trains on ``batch`` (the batch contract: "video", "audio", "index")."""
        video = batch["video"].to(self.device, non_blocking=True)
        audio = batch["audio"].to(self.device, non_blocking=True)
        index = batch["index"].to(self.device, non_blocking=True)
        if self.channels_last:
            video = video.contiguous(memory_format=torch.channels_last_3d)
            audio = audio.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext():
            v, a = self.net(video, audio)
        loss, logs = self.criterion(v, a, index)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss.detach(), logs, index.numel())
