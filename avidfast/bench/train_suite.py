"""Training-step throughput: avidfast's step against a reference-shaped step, same networks.

Both steps run the Table 5 (or 6) encoders and heads on the same random clips, backward, and an
Adam update. The reference-shaped step is float32 with contiguous tensors and the gather / bmm /
unfused-NCE loss of :class:`avidfast.bench.baselines.GatherCrossAVID`; ours is the training
loop's own step, :class:`avidfast.train.step.TrainStep` (GradScaler included: enabled for float16
autocast only, as in training), with the fused AVIDLoss plus, per variant, channels_last_3d and
bfloat16 autocast, so that the table shows which of them helps on the machine at hand. Each
variant has its own copy of the model and optimiser.
"""
import copy
from dataclasses import dataclass

import torch

from avidfast.bench.baselines import GatherCrossAVID
from avidfast.bench.suite import Case
from avidfast.losses import AVIDLoss
from avidfast.models import AVModel
from avidfast.models.av import preset_input_shapes
from avidfast.train.step import TrainStep, to_channels_last


@dataclass
class TrainBenchConfig:
    """Networks, batch and bank of the step (defaults: Table 5 on a CPU)."""

    preset: str = "table5"
    width: int = 64
    batch: int = 8
    num_items: int = 100_000
    negatives: int = 1024
    device: str = "cpu"
    rounds: int = 5
    warmup: int = 1
    seed: int = 0


def _inputs(cfg: TrainBenchConfig, device: torch.device):
    shapes = preset_input_shapes(cfg.preset)
    g = torch.Generator().manual_seed(cfg.seed)
    video = torch.randn(cfg.batch, *shapes["video"], generator=g).to(device)
    audio = torch.randn(cfg.batch, *shapes["audio"], generator=g).to(device)
    index = torch.randperm(cfg.num_items, generator=g)[: cfg.batch].to(device)
    return video, audio, index


def _ours(model, criterion, inputs, device, channels_last: bool, amp_dtype):
    """The training loop's TrainStep on one fixed batch (already on the device; in channels-last
    layouts for the channels_last variants, so the step's conversion finds nothing to do)."""
    video, audio, index = inputs
    if channels_last:
        to_channels_last(model)
        video = video.contiguous(memory_format=torch.channels_last_3d)
        audio = audio.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    train_step = TrainStep(model, criterion, optimizer, scaler, device, amp_dtype, channels_last)
    batch = {"video": video, "audio": audio, "index": index}

    def step() -> None:
        train_step(batch)

    return step


def _step_case(ours_kind: str, channels_last: bool, amp_dtype):
    def build(cfg: TrainBenchConfig, device: torch.device) -> Case:
        torch.manual_seed(cfg.seed)
        model = AVModel.from_preset(cfg.preset, width=cfg.width).to(device).train()
        inputs = _inputs(cfg, device)
        criterion = AVIDLoss(cfg.num_items, 128, cfg.negatives, seed=cfg.seed).to(device)
        reference_model = copy.deepcopy(model)
        reference_loss = GatherCrossAVID(criterion.video_memory.memory.clone(), criterion.audio_memory.memory.clone(),
                                         cfg.negatives)
        reference_optimizer = torch.optim.Adam(reference_model.parameters(), lr=1e-6)
        ours = _ours(model, criterion, inputs, device, channels_last, amp_dtype)
        video, audio, index = inputs

        def reference_shaped() -> None:
            v, a = reference_model(video, audio)
            reference_optimizer.zero_grad(set_to_none=True)
            reference_loss.step(v, a, index)
            reference_optimizer.step()

        shapes = preset_input_shapes(cfg.preset)
        return Case(
            f"step_{ours_kind}",
            f"training step, {cfg.preset} networks (width {cfg.width}), batch {cfg.batch}, video "
            f"{tuple(shapes['video'])}, audio {tuple(shapes['audio'])}, N={cfg.num_items} K={cfg.negatives}: "
            f"ours = the training loop's step (GradScaler), fused AVIDLoss"
            f"{', channels_last_3d' if channels_last else ''}{', bf16 autocast' if amp_dtype else ', fp32'}; baseline = fp32, contiguous, gather/bmm loss",
            {"ours": ours, "reference_shaped": reference_shaped},
            memory="resident" if device.type == "cpu" else "allocator",
        )

    return build


CASES = {
    "step_fp32": _step_case("fp32", False, None),
    "step_channels_last": _step_case("channels_last", True, None),
    "step_bf16": _step_case("bf16", True, torch.bfloat16),
}
