"""The operator benchmark suite: each case runs ours and the reference formulation in one run."""
import itertools
from dataclasses import dataclass
from typing import Callable, Dict

import torch

from avidfast.bench.baselines import AliasSampler, GatherCrossAVID, gather_memory_update_
from avidfast.bench.suite import Case
from avidfast.hugepages import empty_rows
from avidfast.losses import AVIDLoss, MemoryBank
from avidfast.ops import memory_update_, sample_negatives


@dataclass
class OpsBenchConfig:
    """Sizes of the operator benchmarks (defaults: the issue's Cross-AVID step on one device)."""

    num_items: int = 500_000
    batch: int = 128
    negatives: int = 1024
    dim: int = 128
    bank_dtype: torch.dtype = torch.float32
    device: str = "cpu"
    rounds: int = 15
    warmup: int = 3
    seed: int = 0
    distinct_batches: int = 8


def _batches(cfg: OpsBenchConfig, device: torch.device, requires_grad: bool):
    """Endless cycle of (video_emb, audio_emb, index) batches with distinct random indices."""
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for _ in range(cfg.distinct_batches):
        video, audio = (torch.randn(cfg.batch, cfg.dim, generator=g).to(device) for _ in range(2))
        index = torch.randperm(cfg.num_items, generator=g)[: cfg.batch].to(device)
        batches.append((video.requires_grad_(requires_grad), audio.requires_grad_(requires_grad), index))
    return itertools.cycle(batches)


def _same_memory_kind(bank: torch.Tensor) -> torch.Tensor:
    """A copy of bank allocated like avidfast's banks (huge pages on CPU), so that the baseline
    is measured on equally fast memory and the comparison isolates the operators."""
    if bank.device.type != "cpu":
        return bank.clone()
    return empty_rows(*bank.shape, bank.dtype).copy_(bank)


def cross_avid_step(cfg: OpsBenchConfig, device: torch.device) -> Case:
    """AVIDLoss(mode="cross") forward + backward + bank update vs the gather/bmm formulation."""
    ours_loss = AVIDLoss(cfg.num_items, cfg.dim, cfg.negatives, mode="cross", bank_dtype=cfg.bank_dtype,
                         seed=cfg.seed).to(device)
    baseline = GatherCrossAVID(_same_memory_kind(ours_loss.video_memory.memory),
                               _same_memory_kind(ours_loss.audio_memory.memory), cfg.negatives)
    ours_batches, baseline_batches = _batches(cfg, device, True), _batches(cfg, device, True)

    def ours() -> None:
        video, audio, index = next(ours_batches)
        loss, _ = ours_loss(video, audio, index)
        loss.backward()

    def reference_formulation() -> None:
        baseline.step(*next(baseline_batches))

    return Case(
        "cross_avid_step",
        f"Cross-AVID loss step, both directions, fwd+bwd+update: B={cfg.batch} K={cfg.negatives} "
        f"D={cfg.dim} N={cfg.num_items} {str(cfg.bank_dtype).replace('torch.', '')} banks",
        {"ours": ours, "baseline": reference_formulation},
    )


def memory_update(cfg: OpsBenchConfig, device: torch.device) -> Case:
    """memory_update_ on one bank vs index_select/mul/add/normalize/index_copy_."""
    ours_bank = MemoryBank(cfg.num_items, cfg.dim, cfg.bank_dtype, seed=cfg.seed).memory.to(device)
    baseline_bank = _same_memory_kind(ours_bank)
    ours_batches, baseline_batches = _batches(cfg, device, False), _batches(cfg, device, False)

    def ours() -> None:
        video, _, index = next(ours_batches)
        memory_update_(ours_bank, index, video, 0.5)

    def reference_formulation() -> None:
        video, _, index = next(baseline_batches)
        gather_memory_update_(baseline_bank, index, video, 0.5)

    return Case(
        "memory_update",
        f"bank update alone: B={cfg.batch} rows of D={cfg.dim} into N={cfg.num_items}",
        {"ours": ours, "baseline": reference_formulation}, rounds_scale=4,
    )


def negative_sampling(cfg: OpsBenchConfig, device: torch.device) -> Case:
    """sample_negatives (Philox, self excluded) vs the alias method's K + 1 draws per row."""
    sampler = AliasSampler(torch.ones(cfg.num_items, device=device))
    index = torch.randperm(cfg.num_items)[: cfg.batch].to(device)
    steps = itertools.count()

    def ours() -> None:
        sample_negatives(index, cfg.num_items, cfg.negatives, cfg.seed, next(steps))

    def reference_formulation() -> None:
        idx = sampler.draw(cfg.batch * (cfg.negatives + 1)).view(cfg.batch, -1)
        idx[:, 0] = index

    return Case(
        "sample_negatives",
        f"negative draws alone: B={cfg.batch} x K={cfg.negatives} from N={cfg.num_items}",
        {"ours": ours, "baseline": reference_formulation}, rounds_scale=4,
    )


CASES: Dict[str, Callable[[OpsBenchConfig, torch.device], Case]] = {
    "cross_avid_step": cross_avid_step,
    "memory_update": memory_update,
    "sample_negatives": negative_sampling,
}
