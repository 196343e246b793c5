"""`avidfast eval linear`: the linear-probe protocol of the paper (supplement Tables 1 and 4).

Blocks carry the names of the paper's Table 1: ``conv1`` (the stem) and ``block1`` .. ``block4``
(the four residual stages, the reference's conv2x .. conv5x, avidfast's encoder modules block2 ..
block5: :data:`PROBE_BLOCKS`). ``linear.blocks`` empty probes Table 1's four, block1 .. block4.

``linear.variant``:

- ``reference`` (default), the reference implementation's probe: each block's feature map is
  max-pooled over time and to a spatial grid (an adaptive max-pool to :data:`REFERENCE_GRIDS`,
  e.g. 12 x 12 for block1: 64 x 144 = 9216 features), flattened, normalised by a
  ``BatchNorm1d(C)`` with its learned scale and shift, and fed to a ``Linear`` at PyTorch's
  default initialisation;
- ``global_max``, a cheaper probe: one maximum per channel over time and space (C features), a
  ``BatchNorm1d`` without scale and shift, and a ``Linear`` starting at zero.

``linear.backbone_bn``: ``train`` (default, as the reference, whose whole model, frozen encoder
included, is put in training mode while the probes train): the encoder's BatchNorm layers
normalise with batch statistics and update their running statistics (no weight changes, no
gradients); testing uses the updated running statistics. ``eval``: the pre-training running
statistics throughout. Under torchrun the encoder's running statistics are taken from rank 0
before testing (what DistributedDataParallel's buffer broadcast gives the reference).

Every training step reads a batch of augmented clips (video only), and the probes train together
on the sum of their cross-entropies (Adam or SGD, ``cfg.optim``: epochs of ``samples_per_epoch``
clips, lr x ``gamma`` at the milestones). Testing reads ``clips_per_video`` evenly spaced centre
crops per video and reports, per block, clip top-1 and video top-1 (softmax averaged over a
video's clips), and the best block. Each test video is scored exactly once
(:func:`avidfast.eval.data.scored_test_clips`).
"""
import logging
import time
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from avidfast.config import ConfigError
from avidfast.distributed import is_distributed
from avidfast.errors import EvalError
from avidfast.eval.config import EvalConfig
from avidfast.eval.data import labelled_split, scored_test_clips, test_loader, train_loader
from avidfast.eval.features import pool_map, video_level_accuracy
from avidfast.eval.linear_probe import LinearProbe, LinearProbeResult
from avidfast.eval.run import EvalRun

log = logging.getLogger("avidfast")

# Table 1's block names -> the video encoder's feature maps (VideoEncoder.features).
PROBE_BLOCKS: "OrderedDict[str, str]" = OrderedDict(
    conv1="conv1", block1="block2", block2="block3", block3="block4", block4="block5")
DEFAULT_BLOCKS = ("block1", "block2", "block3", "block4")
# The reference's adaptive max-pool output grids (T, H, W) per block (its Kinetics linear config);
# conv1, which the reference does not probe, gets block1's grid (same channels, same map size).
REFERENCE_GRIDS: Dict[str, Tuple[int, int, int]] = {
    "conv1": (1, 12, 12), "block1": (1, 12, 12), "block2": (1, 8, 8), "block3": (1, 6, 6), "block4": (1, 4, 4)}


def probe_features(maps: Dict[str, torch.Tensor], blocks: List[str], variant: str) -> Dict[str, torch.Tensor]:
    """The probes' inputs from the encoder's feature maps (``VideoEncoder.features``: name -> (B, C, T,
    H, W)): block -> (B, D) float32; ``reference``: max-pooled to the block's grid and flattened
    (D = C * prod(grid), channel-major), ``global_max``: one maximum per channel (D = C)."""
    out = {}
    for b in blocks:
        x = maps[PROBE_BLOCKS[b]]
        if variant == "reference":
            out[b] = F.adaptive_max_pool3d(x.float(), REFERENCE_GRIDS[b]).flatten(1)
        else:
            out[b] = pool_map(x, "max").float()
    return out


def probe_feature_sizes(encoder: torch.nn.Module, clip_shape: Tuple[int, int, int, int], variant: str = "reference",
                        blocks=tuple(PROBE_BLOCKS)) -> Dict[str, int]:
    """block -> length of its probe's input for clips of ``clip_shape`` (3, T, H, W), computed by running
    ``encoder`` on a meta-device copy (shapes only: no memory, no arithmetic)."""
    import copy

    meta = copy.deepcopy(encoder).to("meta").eval()
    with torch.no_grad():
        maps = meta.features(torch.empty((1, *clip_shape), device="meta"))
    missing = [b for b in blocks if PROBE_BLOCKS[b] not in maps]
    if missing:
        raise ConfigError(f"linear.blocks: this encoder gives no map for {missing} (it gives {list(maps)})")
    return {b: int(v.shape[1]) for b, v in probe_features(maps, list(blocks), variant).items()}


def _probe_blocks(cfg: EvalConfig) -> List[str]:
    blocks = list(cfg.linear.blocks) or list(DEFAULT_BLOCKS)
    unknown = [b for b in blocks if b not in PROBE_BLOCKS]
    if unknown:
        raise ConfigError(f"linear.blocks: {unknown} are not blocks of the video encoder; choose among "
                          f"{list(PROBE_BLOCKS)} (the names of the paper's Table 1)")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"linear.blocks: {blocks} names a block twice")
    return blocks


def _encoder_maps(encoder, video: torch.Tensor, run: EvalRun) -> Dict[str, torch.Tensor]:
    """The frozen encoder's feature maps of ``video`` (B, 3, T, H, W), without gradients."""
    cast = torch.autocast(run.device.type, dtype=run.autocast) if run.autocast else torch.autocast(
        run.device.type, enabled=False)
    with torch.no_grad(), cast:
        return encoder.features(video.to(run.device, non_blocking=True))


def _share_running_statistics(encoder: torch.nn.Module) -> None:
    """Every rank takes rank 0's BatchNorm running statistics (under torchrun; nothing otherwise)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    for buffer in encoder.buffers():
        dist.broadcast(buffer.data, src=0)


def run_linear_eval(cfg: EvalConfig, encoder: torch.nn.Module, run: EvalRun) -> LinearProbeResult:
    """Trains and tests the per-block linear probes of ``cfg`` on the frozen video ``encoder``
    (anything with ``features(x) -> {conv1, block2..block5: map}``; it is changed in place only in its
    BatchNorm running statistics, with ``linear.backbone_bn=train``); returns a LinearProbeResult
    (fractions in [0, 1])."""
    started = time.perf_counter()
    split = labelled_split(cfg)
    num_classes = len(split.classes)
    blocks = _probe_blocks(cfg)
    variant = cfg.linear.variant
    encoder = encoder.to(run.device).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    loader = train_loader(cfg, split, run.rank, run.world)
    if len(loader) == 0:
        raise EvalError(f"{cfg.data.train_manifest}: fewer training clips than one batch of "
                         f"{cfg.per_process_batch(run.world)} per process; lower optim.batch_size (or "
                         "optim.global_batch_size)")
    clip_shape = (3, cfg.data.video.frames, cfg.data.video.crop, cfg.data.video.crop)
    dims = probe_feature_sizes(encoder, clip_shape, variant, blocks)
    torch.manual_seed(cfg.seed)
    reference = variant == "reference"
    probe = LinearProbe(dims, num_classes, standardize=False, bn_affine=reference, zero_init=not reference)
    probe = probe.to(run.device)
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
    log.info("linear probes (%s) on %s (%s features): %d classes, %d train / %d test videos, %d epochs of %d "
             "batches, device %s", variant, ", ".join(blocks), ", ".join(str(dims[b]) for b in blocks), num_classes,
             len(split.train), len(split.test), cfg.optim.epochs, len(loader), run.device)

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
        encoder.train(cfg.linear.backbone_bn == "train")
        sums = {b: torch.zeros((), dtype=torch.float64) for b in blocks}
        hits = {b: 0 for b in blocks}
        seen = 0
        for batch in loader:
            feats = probe_features(_encoder_maps(encoder, batch["video"], run), blocks, variant)
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
                    run.scalar(f"linear/loss_{b}", float(losses[b].detach()), step)
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
    encoder.eval()
    _share_running_statistics(encoder)
    probe.eval()
    scores: Dict[str, List[torch.Tensor]] = {b: [torch.zeros(0, num_classes)] for b in blocks}
    index, label = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    test = test_loader(cfg, split.test, split.classes, run.rank, run.world)
    iterator = test
    if cfg.run.progress and run.rank == 0:
        from tqdm import tqdm

        iterator = tqdm(test, total=len(test), desc="test clips", unit="batch")
    with torch.no_grad():
        for batch in iterator:
            logits = probe(probe_features(_encoder_maps(encoder, batch["video"], run), blocks, variant))
            for b in blocks:
                scores[b].append(logits[b].float().softmax(dim=1).cpu())
            index.append(batch["index"].cpu())
            label.append(batch["label"].cpu())
    # a rank may hold no held-out video (more ranks than videos): it gathers empty tables
    empty_ids, empty_scores = torch.empty(0, dtype=torch.int64), torch.empty(0, num_classes)
    scored = scored_test_clips(test, split.test, cfg.data.clips_per_video,
                               {b: torch.cat(scores[b] or [empty_scores]) for b in blocks},
                               torch.cat(index or [empty_ids]), torch.cat(label or [empty_ids]))
    clip_top1, video_top1 = {}, {}
    for b in blocks:
        s = scored.scores[b]
        clip_top1[b] = float((s.argmax(dim=1) == scored.label).double().mean()) if s.numel() else 0.0
        video_top1[b] = video_level_accuracy(s, scored.index, scored.label) if s.numel() else 0.0
    best = max(blocks, key=lambda b: (video_top1[b], clip_top1[b], -blocks.index(b)))
    summary = scored.summary()
    return LinearProbeResult(
        blocks=blocks, clip_top1=clip_top1, video_top1=video_top1, train_top1=train_top1, train_loss=train_loss,
        best_block=best, chance=1.0 / num_classes, num_classes=num_classes,
        num_train=cfg.optim.epochs * len(loader) * cfg.per_process_batch(run.world) * run.world,
        num_test=summary["num_test"], num_test_videos=summary["num_test_videos"],
        seconds=time.perf_counter() - started,
        settings={"protocol": "linear", "variant": variant,
                  "batch_size_per_process": cfg.per_process_batch(run.world),
                  "global_batch_size": cfg.per_process_batch(run.world) * run.world, "backbone_bn": cfg.linear.backbone_bn,
                  "epochs": cfg.optim.epochs, "lr": cfg.optim.lr, "milestones": list(cfg.optim.milestones),
                  "gamma": cfg.optim.gamma, "clips_per_video": cfg.data.clips_per_video, "classes": split.classes,
                  "grids": {b: list(REFERENCE_GRIDS[b]) for b in blocks} if variant == "reference" else None},
        feature_sizes=dims, num_excluded_test_videos=summary["num_excluded_test_videos"],
        excluded_test_videos=summary["excluded_test_videos"],
        model=probe,
    )
