"""The migration benchmark suite: each peer's training-step loss work against avidfast's drop-in
(docs/migration.md), both in one run. Peers: avidfast/bench/peers.py (their equations, their
shape: alias draws, (B, K + 1, D) gather, bmm, unfused criterion, autograd, index_copy_ update)."""
import itertools
from typing import Callable, Dict

import torch

from avidfast.bench import peers
from avidfast.bench.ops_suite import OpsBenchConfig, _same_memory_kind
from avidfast.bench.suite import Case
from avidfast.losses import AVIDLoss, MemoryNCE


def _batches(cfg: OpsBenchConfig, device: torch.device, views: int):
    """Endless cycle of (embeddings x views, index) with distinct random indices, requiring grad."""
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for _ in range(cfg.distinct_batches):
        embeddings = [torch.randn(cfg.batch, cfg.dim, generator=g).to(device).requires_grad_() for _ in range(views)]
        index = torch.randperm(cfg.num_items, generator=g)[: cfg.batch].to(device)
        batches.append((*embeddings, index))
    return itertools.cycle(batches)


def _single_bank_case(name: str, description: str, ours_loss: MemoryNCE, peer_step: Callable,
                      cfg: OpsBenchConfig, device: torch.device, rounds_scale: int = 1) -> Case:
    ours_batches, peer_batches = _batches(cfg, device, 1), _batches(cfg, device, 1)

    def ours() -> None:
        x, index = next(ours_batches)
        loss, _ = ours_loss(x, index)
        loss.backward()

    def peer() -> None:
        peer_step(*next(peer_batches))

    return Case(name, description, {"ours": ours, "peer": peer}, rounds_scale=rounds_scale)


def _sizes(cfg: OpsBenchConfig) -> str:
    return f"B={cfg.batch} K={cfg.negatives} D={cfg.dim} N={cfg.num_items} {str(cfg.bank_dtype).replace('torch.', '')} banks"


def lemniscate_nce(cfg: OpsBenchConfig, device: torch.device) -> Case:
    """MemoryNCE(objective="nce") vs lemniscate's NCEAverage + NCECriterion (and VISSL's "nce")."""
    ours = MemoryNCE(cfg.num_items, cfg.dim, cfg.negatives, objective="nce", partition_estimate="with_positive",
                     duplicates="last", bank_dtype=cfg.bank_dtype, seed=cfg.seed).to(device)
    peer = peers.PeerNCE(_same_memory_kind(ours.bank.memory), cfg.negatives)
    return _single_bank_case("lemniscate_nce", f"NCE step, fwd+bwd+update: {_sizes(cfg)}", ours, peer.step, cfg, device)


def npid_infonce(cfg: OpsBenchConfig, device: torch.device) -> Case:
    """MemoryNCE(objective="infonce") vs mmselfsup's NPID (SimpleMemory + ContrastiveHead)."""
    ours = MemoryNCE(cfg.num_items, cfg.dim, cfg.negatives, objective="infonce", duplicates="last",
                     bank_dtype=cfg.bank_dtype, seed=cfg.seed).to(device)
    peer = peers.PeerNPID(_same_memory_kind(ours.bank.memory), cfg.negatives)
    return _single_bank_case("npid_infonce", f"sampled-softmax (InfoNCE) step, fwd+bwd+update: {_sizes(cfg)}",
                             ours, peer.step, cfg, device)


def lemniscate_softmax(cfg: OpsBenchConfig, device: torch.device) -> Case:
    """MemoryNCE(objective="softmax") vs lemniscate's LinearAverage + CrossEntropyLoss (all N rows)."""
    ours = MemoryNCE(cfg.num_items, cfg.dim, objective="softmax", duplicates="last", bank_dtype=cfg.bank_dtype,
                     seed=cfg.seed).to(device)
    peer = peers.PeerLinearAverage(_same_memory_kind(ours.bank.memory))
    return _single_bank_case("lemniscate_softmax",
                             f"full softmax over the bank, fwd+bwd+update: B={cfg.batch} D={cfg.dim} N={cfg.num_items}",
                             ours, peer.step, cfg, device)


def cmc_two_view(cfg: OpsBenchConfig, device: torch.device) -> Case:
    """AVIDLoss(mode="cross") (twice its loss: CMC sums the views) vs CMC's two-view NCEAverage."""
    ours_loss = AVIDLoss(cfg.num_items, cfg.dim, cfg.negatives, mode="cross", bank_dtype=cfg.bank_dtype,
                         seed=cfg.seed, partition="per_pair").to(device)
    peer = peers.PeerCMC(_same_memory_kind(ours_loss.video_memory.memory),
                         _same_memory_kind(ours_loss.audio_memory.memory), cfg.negatives)
    ours_batches, peer_batches = _batches(cfg, device, 2), _batches(cfg, device, 2)

    def ours() -> None:
        l, ab, index = next(ours_batches)
        loss, _ = ours_loss(l, ab, index)
        (2 * loss).backward()

    def peer_step() -> None:
        peer.step(*next(peer_batches))

    return Case("cmc_two_view", f"two-view NCE step, both views, fwd+bwd+update: {_sizes(cfg)}",
                {"ours": ours, "peer": peer_step})


CASES: Dict[str, Callable[[OpsBenchConfig, torch.device], Case]] = {
    "lemniscate_nce": lemniscate_nce,
    "npid_infonce": npid_infonce,
    "cmc_two_view": cmc_two_view,
    "lemniscate_softmax": lemniscate_softmax,
}
