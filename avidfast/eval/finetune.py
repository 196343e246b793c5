"""`avidfast eval finetune`: fine-tuning the whole video encoder (supplement Table 4, UCF / HMDB rows).

A copy of the pre-trained video encoder (the caller's model is left as it is) gets dropout and a
``Linear(out_dim, num_classes)`` on its globally pooled output, and the whole network trains on
augmented clips of the training manifest (Table 4: multi-scale crop, flip, colour jitter of
``cfg.data.video``) with cross-entropy: Adam (or SGD with momentum 0.9) at ``cfg.optim.lr``,
epochs of ``samples_per_epoch`` clips, lr x ``gamma`` at each milestone epoch. With
``finetune.freeze_bn`` the BatchNorm layers stay in eval mode (pre-training statistics; their
affine parameters still train). With ``finetune.warmup_epochs`` (the reference's classifier
warm-up: 5 epochs in its UCF / HMDB configs) the run starts with that many epochs in which only
the classifier is optimised (its own Adam / SGD at ``cfg.optim.lr``, no decay), the network in
training mode, before the whole network trains for ``cfg.optim.epochs``. The clips are video
only; videos shorter than a clip are padded by repeating their frames, as the reference pads
them. Testing reads ``clips_per_video`` evenly spaced centre crops per test video, each test
video exactly once (:func:`avidfast.eval.data.scored_test_clips`), and reports clip top-1 and
video top-1 (softmax averaged over a video's clips).

Under torchrun the network is wrapped in DDP and each process reads its share of the clips; the
test scores are gathered before counting. Rank 0 writes the fine-tuned weights to
``<run_dir>/finetuned.pt`` (atomically).
"""
import copy
import logging
import os
import time
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from avidfast.distributed import all_reduce_sum
from avidfast.errors import EvalError
from avidfast.eval.config import EvalConfig
from avidfast.eval.data import labelled_split, scored_test_clips, test_loader, train_loader
from avidfast.eval.features import video_level_accuracy
from avidfast.eval.run import EvalRun

log = logging.getLogger("avidfast")

WEIGHTS_NAME = "finetuned.pt"


class FinetuneClassifier(torch.nn.Module):
    """Video encoder, dropout, linear classifier: video (B, 3, T, H, W) -> logits (B, num_classes).

    ``encoder`` is any module with ``out_dim`` and ``forward(x) -> (B, out_dim)``. With
    ``freeze_bn``, :meth:`train` keeps every BatchNorm layer in eval mode (running statistics are
    used and not updated).
    """

    def __init__(self, encoder: torch.nn.Module, num_classes: int, dropout: float, freeze_bn: bool = False):
        super().__init__()
        if not isinstance(getattr(encoder, "out_dim", None), int):
            raise TypeError(f"{type(encoder).__name__} has no integer out_dim; fine-tuning needs an encoder whose "
                            "forward(x) returns (B, out_dim) pooled features")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.encoder, self.freeze_bn = encoder, freeze_bn
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(encoder.out_dim, num_classes)

    def train(self, mode: bool = True) -> "FinetuneClassifier":
        """Sets train / eval mode; with ``freeze_bn`` the BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, num_classes) logits."""
        return self.classifier(self.dropout(self.encoder(video)))


@dataclass
class FinetuneResult:
    """Test and training accuracies of one fine-tuning run (fractions in [0, 1]).

    ``clip_top1`` / ``video_top1``: test top-1 per clip and per video (mean of softmax over the
    video's clips); ``train_loss`` / ``train_top1`` / ``lr``: per epoch, the mean cross-entropy and
    clip top-1 on the augmented training clips (of all processes under torchrun) and the
    learning rate it trained at; ``warmup_loss`` / ``warmup_top1``: the same for the classifier
    warm-up epochs. ``chance`` = 1 / num_classes. ``num_train``: training clips read (all
    processes, warm-up included); ``num_test`` / ``num_test_videos``: test clips and videos scored;
    ``excluded_test_videos`` / ``num_excluded_test_videos``: unreadable test videos left out
    (``data.on_bad_test_video=exclude``). ``weights``: the fine-tuned checkpoint (``None`` when none
    was written). ``model`` is the fine-tuned :class:`FinetuneClassifier` (not in :meth:`to_dict`).
    """

    clip_top1: float
    video_top1: float
    train_loss: List[float]
    train_top1: List[float]
    lr: List[float]
    chance: float
    num_classes: int
    num_train: int
    num_test: int
    num_test_videos: int
    seconds: float
    weights: Optional[str] = None
    settings: Dict[str, object] = field(default_factory=dict)
    warmup_loss: List[float] = field(default_factory=list)
    warmup_top1: List[float] = field(default_factory=list)
    num_excluded_test_videos: int = 0
    excluded_test_videos: List[Dict[str, str]] = field(default_factory=list)
    model: Optional[FinetuneClassifier] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> Dict[str, object]:
        """Everything but the model, as plain Python values (e.g. for JSON)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "model"}

    def format(self) -> str:
        """A printable table: one row per epoch (loss, train top-1 in percent, lr), then the test top-1."""
        lines = [
            f"fine-tuning: {self.num_classes} classes (chance {100 * self.chance:.2f}%), {self.num_train} train clips, "
            f"{self.num_test} test clips of {self.num_test_videos} videos, {self.seconds:.1f} s",
            f"{'epoch':>5}  {'train loss':>10}  {'train top-1':>11}  {'lr':>9}",
        ]
        for epoch, (loss, top1) in enumerate(zip(self.warmup_loss, self.warmup_top1), start=1):
            lines.append(f"{'w' + str(epoch):>5}  {loss:>10.4f}  {100 * top1:>11.2f}  {'classifier':>9}")
        for epoch, (loss, top1, lr) in enumerate(zip(self.train_loss, self.train_top1, self.lr), start=1):
            lines.append(f"{epoch:>5}  {loss:>10.4f}  {100 * top1:>11.2f}  {lr:>9.2e}")
        lines.append(f"test: clip top-1 {100 * self.clip_top1:.2f}%, video top-1 {100 * self.video_top1:.2f}%")
        if self.num_excluded_test_videos:
            lines.append(f"{self.num_excluded_test_videos} unreadable test videos excluded (listed in results.json)")
        return "\n".join(lines)


def _autocast(run: EvalRun):
    if run.autocast is not None:
        return torch.autocast(run.device.type, dtype=run.autocast)
    return torch.autocast(run.device.type, enabled=False)


def _optimizer(cfg: EvalConfig, params) -> torch.optim.Optimizer:
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)


def _train_epoch(cfg: EvalConfig, model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, run: EvalRun,
                 epoch: int, bar, counter: Dict[str, int], tag: str):
    """One epoch of cross-entropy on augmented clips, stepping ``optimizer`` (the whole network, or the
    classifier alone during the warm-up: the other gradients are computed and discarded). Returns the
    epoch's (mean loss, clip top-1) over all processes."""
    loader.set_epoch(epoch)
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    total, hits, seen = 0.0, 0, 0
    for batch in loader:
        video = batch["video"].to(run.device, non_blocking=True)
        target = batch["label"].to(run.device, non_blocking=True)
        with _autocast(run):
            logits = model(video)
        loss = F.cross_entropy(logits.float(), target)
        model.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        total += loss_value * target.numel()
        hits += int((logits.argmax(dim=1) == target).sum())
        seen += target.numel()
        counter["step"] += 1
        if counter["step"] % cfg.run.log_every == 0:
            run.scalar(f"{tag}/loss", loss_value, counter["step"])
            run.scalar(f"{tag}/lr", lr, counter["step"])
            run.scalar("data/bad_samples", loader.bad_samples, counter["step"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=f"{tag} {epoch + 1}", loss=f"{loss_value:.3f}")
    total, hits, seen = all_reduce_sum(torch.tensor([total, hits, seen], dtype=torch.float64,
                                                    device=run.device)).tolist()
    return total / max(seen, 1), hits / max(seen, 1)


def run_finetune(cfg: EvalConfig, video_encoder: torch.nn.Module, run: EvalRun) -> FinetuneResult:
    """Fine-tunes a copy of ``video_encoder`` (``out_dim`` and ``forward(x) -> (B, out_dim)``) with a
    dropout + linear classifier on ``cfg``'s training manifest and tests it on its test manifest.

    Returns a :class:`FinetuneResult`; rank 0 also writes ``<run.run_dir>/finetuned.pt``. Raises
    ManifestError / EvalError naming the manifest or the setting at fault.
    """
    started = time.perf_counter()
    split = labelled_split(cfg)
    num_classes = len(split.classes)
    loader = train_loader(cfg, split, run.rank, run.world)
    if len(loader) == 0:
        raise EvalError(f"{cfg.data.train_manifest}: fewer training clips than one batch of "
                         f"{cfg.per_process_batch(run.world)} per process; lower optim.batch_size (or "
                         "optim.global_batch_size)")
    encoder = copy.deepcopy(video_encoder)
    for p in encoder.parameters():
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    network = FinetuneClassifier(encoder, num_classes, cfg.finetune.dropout, cfg.finetune.freeze_bn).to(run.device)
    model = network
    if run.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    optimizer = _optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.optim.milestones, gamma=cfg.optim.gamma)
    torch.manual_seed(cfg.seed + 1 + run.rank)  # dropout masks: reproducible, different on every process
    log.info("fine-tuning: %d classes, %d train / %d test videos, %d epochs of %d batches, device %s%s",
             num_classes, len(split.train), len(split.test), cfg.optim.epochs, len(loader), run.device,
             ", bf16" if run.autocast is torch.bfloat16 else "")

    bar = None
    if cfg.run.progress and run.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=(cfg.finetune.warmup_epochs + cfg.optim.epochs) * len(loader), desc="fine-tuning",
                   unit="batch")
    counter = {"step": 0}
    warmup_loss: List[float] = []
    warmup_top1: List[float] = []
    if cfg.finetune.warmup_epochs:
        # The classifier alone first; its own optimiser, constant lr (the reference's warm-up).
        warmup = _optimizer(cfg, network.classifier.parameters())
        for epoch in range(cfg.finetune.warmup_epochs):
            loss, top1 = _train_epoch(cfg, model, loader, warmup, run, epoch, bar, counter, "warmup")
            warmup_loss.append(loss)
            warmup_top1.append(top1)
            run.scalar("finetune/warmup_loss", loss, epoch + 1)
    train_loss: List[float] = []
    train_top1: List[float] = []
    lrs: List[float] = []
    for epoch in range(cfg.optim.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        loss, top1 = _train_epoch(cfg, model, loader, optimizer, run, cfg.finetune.warmup_epochs + epoch, bar, counter,
                                  "finetune")
        scheduler.step()
        train_loss.append(loss)
        train_top1.append(top1)
        run.scalar("finetune/train_loss", loss, epoch + 1)
        run.scalar("finetune/train_top1", top1, epoch + 1)
    if bar is not None:
        bar.close()

    weights = None
    if run.rank == 0:
        from avidfast.checkpoints.store import save_checkpoint

        weights = os.path.join(run.run_dir, WEIGHTS_NAME)
        save_checkpoint(weights, {"model": network.state_dict(), "classes": list(split.classes),
                                  "epoch": cfg.optim.epochs, "config": cfg.to_dict()})
        log.info("fine-tuned weights: %s", weights)

    # Test: every clip of every held-out video, this rank's share, then gathered.
    network.eval()
    scores = [torch.zeros(0, num_classes)]
    index, label = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    test = test_loader(cfg, split.test, split.classes, run.rank, run.world)
    iterator = test
    if cfg.run.progress and run.rank == 0:
        from tqdm import tqdm

        iterator = tqdm(test, total=len(test), desc="test clips", unit="batch")
    with torch.no_grad():
        for batch in iterator:
            with _autocast(run):
                logits = network(batch["video"].to(run.device, non_blocking=True))
            scores.append(logits.float().softmax(dim=1).cpu())
            index.append(batch["index"].cpu())
            label.append(batch["label"].cpu())
    # a rank may hold no held-out video (more ranks than videos): it gathers empty tables
    empty_ids, empty_scores = torch.empty(0, dtype=torch.int64), torch.empty(0, num_classes)
    scored = scored_test_clips(test, split.test, cfg.data.clips_per_video,
                               {"scores": torch.cat(scores or [empty_scores])},
                               torch.cat(index or [empty_ids]), torch.cat(label or [empty_ids]))
    scores_all, label_all = scored.scores["scores"], scored.label
    summary = scored.summary()
    return FinetuneResult(
        clip_top1=float((scores_all.argmax(dim=1) == label_all).double().mean()) if label_all.numel() else 0.0,
        video_top1=video_level_accuracy(scores_all, scored.index, label_all) if label_all.numel() else 0.0,
        train_loss=train_loss, train_top1=train_top1, lr=lrs, chance=1.0 / num_classes, num_classes=num_classes,
        num_train=(cfg.finetune.warmup_epochs + cfg.optim.epochs) * len(loader) * cfg.per_process_batch(run.world) * run.world,
        num_test=summary["num_test"], num_test_videos=summary["num_test_videos"],
        warmup_loss=warmup_loss, warmup_top1=warmup_top1,
        num_excluded_test_videos=summary["num_excluded_test_videos"],
        excluded_test_videos=summary["excluded_test_videos"],
        seconds=time.perf_counter() - started, weights=weights,
        settings={"protocol": "finetune", "epochs": cfg.optim.epochs, "batch_size_per_process": cfg.per_process_batch(run.world),
                  "global_batch_size": cfg.per_process_batch(run.world) * run.world,
                  "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay, "optimizer": cfg.optim.optimizer,
                  "samples_per_epoch": cfg.optim.samples_per_epoch, "milestones": list(cfg.optim.milestones),
                  "gamma": cfg.optim.gamma, "dropout": cfg.finetune.dropout, "freeze_bn": cfg.finetune.freeze_bn,
                  "warmup_epochs": cfg.finetune.warmup_epochs,
                  "frames": cfg.data.video.frames, "crop": cfg.data.video.crop,
                  "clips_per_video": cfg.data.clips_per_video, "classes": split.classes},
        model=network,
    )
