"""`avidfast eval linear`: the paper's linear-probe protocol (supplement Tables 1 and 4).

The video encoder is frozen (eval mode, no gradients). Every training step reads a batch of
augmented clips (Table 4: multi-scale crop and flip), max-pools each block's feature map over
time and space, normalises it with a BatchNorm1d without affine parameters and feeds one linear
classifier per block; the classifiers train together on the sum of their cross-entropies
(Adam, ``cfg.optim``: epochs of ``samples_per_epoch`` clips, lr x ``gamma`` at the milestones).
Testing reads ``clips_per_video`` evenly spaced centre crops per video and reports, per block,
clip top-1 and video top-1 (softmax averaged over a video's clips), and the best block.

Under torchrun each process reads its share of the clips; the probes are wrapped in DDP and the
test scores are gathered before counting, so the result does not depend on the process count
beyond the order of the minibatches.
"""
import logging
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from avidfast.config import ConfigError
from avidfast.distributed import all_gather_rows
from avidfast.errors import EvalError
from avidfast.eval.config import EvalConfig
from avidfast.eval.data import labelled_split, test_loader, train_loader
from avidfast.eval.features import pool_map, video_level_accuracy
from avidfast.eval.linear_probe import LinearProbe, LinearProbeResult
from avidfast.eval.run import EvalRun

log = logging.getLogger("avidfast")


def _block_features(encoder, video: torch.Tensor, blocks: List[str], pool: str, run: EvalRun) -> Dict[str, torch.Tensor]:
    """Frozen features: video (B, 3, T, H, W) -> block -> (B, C_block) float32."""
    cast = torch.autocast(run.device.type, dtype=run.autocast) if run.autocast else torch.autocast(
        run.device.type, enabled=False)
    with torch.no_grad(), cast:
        maps = encoder.features(video.to(run.device, non_blocking=True))
    return {b: pool_map(maps[b], pool).float() for b in blocks}


def run_linear_eval(cfg: EvalConfig, encoder: torch.nn.Module, run: EvalRun) -> LinearProbeResult:
    """Trains and tests the per-block linear probes of ``cfg`` on the frozen video ``encoder``
    (anything with ``features(x) -> {block: map}``); returns a LinearProbeResult (fractions in [0, 1])."""
    started = time.perf_counter()
    split = labelled_split(cfg)
    num_classes = len(split.classes)
    encoder = encoder.to(run.device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    loader = train_loader(cfg, split, run.rank, run.world)
    if len(loader) == 0:
        raise EvalError(f"{cfg.data.train_manifest}: fewer training clips than one batch of {cfg.optim.batch_size} "
                         "per process; lower optim.batch_size")
    loader.set_epoch(0)
    first = next(iter(loader))
    with torch.no_grad():
        maps = encoder.features(first["video"][:1].to(run.device))
    blocks = list(cfg.linear.blocks) or list(maps)
    missing = [b for b in blocks if b not in maps]
    if missing:
        raise ConfigError(f"linear.blocks: {missing} are not blocks of this encoder (it has {list(maps)})")
    dims = {b: pool_map(maps[b], cfg.linear.pool).shape[1] for b in blocks}
    torch.manual_seed(cfg.seed)
    probe = LinearProbe(dims, num_classes, standardize=False).to(run.device)
    model = probe
    if run.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            probe, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if cfg.optim.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9,
                                    weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.optim.milestones, gamma=cfg.optim.gamma)
    log.info("linear probes on %s: %d classes, %d train / %d test videos, %d epochs of %d batches, device %s",
             ", ".join(blocks), num_classes, len(split.train), len(split.test), cfg.optim.epochs, len(loader), run.device)

    bar = None
    if cfg.run.progress and run.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.optim.epochs * len(loader), desc="linear probes", unit="batch")
    step = 0
    train_loss: Dict[str, float] = {}
    train_top1: Dict[str, float] = {}
    for epoch in range(cfg.optim.epochs):
        loader.set_epoch(epoch)
        model.train()
        sums = {b: torch.zeros((), dtype=torch.float64) for b in blocks}
        hits = {b: 0 for b in blocks}
        seen = 0
        for batch in loader:
            feats = _block_features(encoder, batch["video"], blocks, cfg.linear.pool, run)
            target = batch["label"].to(run.device)
            logits = model(feats)
            losses = {b: F.cross_entropy(logits[b], target) for b in blocks}
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            for b in blocks:
                sums[b] += float(losses[b].detach()) * target.numel()
                hits[b] += int((logits[b].argmax(dim=1) == target).sum())
            seen += target.numel()
            step += 1
            if step % cfg.run.log_every == 0:
                for b in blocks:
                    run.scalar(f"linear/loss_{b}", float(losses[b]), step)
                run.scalar("linear/lr", optimizer.param_groups[0]["lr"], step)
                run.scalar("data/bad_samples", loader.bad_samples, step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(sum(losses.values())) / len(blocks):.3f}")
        scheduler.step()
        train_loss = {b: float(sums[b]) / max(seen, 1) for b in blocks}
        train_top1 = {b: hits[b] / max(seen, 1) for b in blocks}
        for b in blocks:
            run.scalar(f"linear/train_top1_{b}", train_top1[b], epoch + 1)
    if bar is not None:
        bar.close()

    # Test: every clip of every held-out video, this rank's share, then gathered.
    probe.eval()
    scores = {b: [] for b in blocks}
    index, label = [], []
    test = test_loader(cfg, split.test, split.classes, run.rank, run.world)
    iterator = test
    if cfg.run.progress and run.rank == 0:
        from tqdm import tqdm

        iterator = tqdm(test, total=len(test), desc="test clips", unit="batch")
    with torch.no_grad():
        for batch in iterator:
            logits = probe(_block_features(encoder, batch["video"], blocks, cfg.linear.pool, run))
            for b in blocks:
                scores[b].append(logits[b].softmax(dim=1).cpu())
            index.append(batch["index"].cpu())
            label.append(batch["label"].cpu())
    # a rank may hold no held-out video (more ranks than videos): it gathers empty tables
    empty_ids, empty_scores = torch.empty(0, dtype=torch.int64), torch.empty(0, num_classes)
    index_all, label_all, *gathered = all_gather_rows([torch.cat(index or [empty_ids]), torch.cat(label or [empty_ids])]
                                                      + [torch.cat(scores[b] or [empty_scores]) for b in blocks])
    clip_top1, video_top1 = {}, {}
    for b, s in zip(blocks, gathered):
        clip_top1[b] = float((s.argmax(dim=1) == label_all).double().mean())
        video_top1[b] = video_level_accuracy(s, index_all, label_all)
    best = max(blocks, key=lambda b: (video_top1[b], clip_top1[b], -blocks.index(b)))
    return LinearProbeResult(
        blocks=blocks, clip_top1=clip_top1, video_top1=video_top1, train_top1=train_top1, train_loss=train_loss,
        best_block=best, chance=1.0 / num_classes, num_classes=num_classes,
        num_train=cfg.optim.epochs * len(loader) * cfg.optim.batch_size * run.world,
        num_test=int(index_all.numel()), num_test_videos=int(index_all.unique().numel()),
        seconds=time.perf_counter() - started,
        settings={"protocol": "linear", "epochs": cfg.optim.epochs, "lr": cfg.optim.lr,
                  "milestones": list(cfg.optim.milestones), "gamma": cfg.optim.gamma, "pool": cfg.linear.pool,
                  "clips_per_video": cfg.data.clips_per_video, "classes": split.classes},
        model=probe,
    )
