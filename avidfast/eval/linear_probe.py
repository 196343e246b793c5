"""Linear probes per block on frozen features (the paper's Table 1 protocol, on cached features).

One linear classifier per block, all trained in one loop: every block's features are normalised
(standardised with the training set's per-dimension mean / std, or a BatchNorm1d without affine
parameters), then a ``Linear(C_block, num_classes)`` initialised at zero. The loss is the sum of
the blocks' cross-entropies; the blocks share no parameter, so with Adam or SGD (both
per-parameter) each block's probe is exactly the probe it would be if trained alone with the same
seed (same minibatch order, same initialisation).

Accuracy is top-1 per block at clip level, and at video level: the softmax probabilities of a
video's clips (clips sharing an ``index``) are averaged before the arg-max.
"""
import copy
import time
from dataclasses import dataclass, field, fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from avidfast.eval.features import FeatureSet, video_level_accuracy

__all__ = ["LinearProbe", "LinearProbeResult", "as_feature_set", "predict_proba", "train_linear_probe"]

# The Kinetics schedule of Table 4 (20 epochs, decay x0.3 at 8, 12, 15, 18), as fractions of the run.
PAPER_MILESTONES = (0.4, 0.6, 0.75, 0.9)
OPTIMIZERS = ("adam", "sgd")
DEFAULT_BLOCK = "features"  # the block name of a bare (X, y) input

ProbeData = Union[FeatureSet, Tuple]


class LinearProbe(torch.nn.Module):
    """Per block: normalisation, then ``Linear(C_block, num_classes)``.

    ``forward(features)`` maps a dict block -> (N, C_block) to a dict block -> (N, classes) logits.
    With ``standardize`` the buffers ``mean_i`` / ``std_i`` hold the training statistics of block
    i (set by :meth:`set_statistics`); otherwise a ``BatchNorm1d`` normalises, with a learned scale
    and shift when ``bn_affine`` (the reference's ``BatchNorm1d(C)``), without them otherwise.
    ``zero_init``: the linear layers start at zero; else at PyTorch's default initialisation (the
    reference's).
    """

    def __init__(self, dims: Mapping[str, int], num_classes: int, standardize: bool = True, *,
                 bn_affine: bool = False, zero_init: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.blocks = list(dims)
        self.num_classes, self.standardize = num_classes, standardize
        self.heads = torch.nn.ModuleList(torch.nn.Linear(int(dims[b]), num_classes) for b in self.blocks)
        if zero_init:
            for head in self.heads:
                torch.nn.init.zeros_(head.weight)
                torch.nn.init.zeros_(head.bias)
        if standardize:
            self.norms = None
            for i, b in enumerate(self.blocks):
                self.register_buffer(f"mean_{i}", torch.zeros(int(dims[b])))
                self.register_buffer(f"std_{i}", torch.ones(int(dims[b])))
        else:
            self.norms = torch.nn.ModuleList(torch.nn.BatchNorm1d(int(dims[b]), affine=bn_affine)
                                             for b in self.blocks)

    def set_statistics(self, features: Mapping[str, torch.Tensor], eps: float = 1e-6) -> None:
        """Standardisation statistics from the training features (no-op with BatchNorm)."""
        if not self.standardize:
            return
        for i, b in enumerate(self.blocks):
            x = features[b].to(torch.float64)
            getattr(self, f"mean_{i}").copy_(x.mean(dim=0))
            getattr(self, f"std_{i}").copy_(x.std(dim=0, unbiased=False).clamp_min(eps))

    def block_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            x = (x - getattr(self, f"mean_{i}")) / getattr(self, f"std_{i}")
        else:
            x = self.norms[i](x)
        return self.heads[i](x)

    def forward(self, features: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {b: self.block_logits(i, features[b]) for i, b in enumerate(self.blocks)}


@dataclass
class LinearProbeResult:
    """Top-1 accuracies (fractions in [0, 1]) of the per-block linear probes.

    ``clip_top1[b]`` / ``video_top1[b]``: test accuracy of block b's probe per clip and per
    video (mean of softmax over the video's clips); ``train_top1[b]``: clip accuracy on the
    training set; ``train_loss[b]``: mean cross-entropy over the last epoch. ``best_block``: the
    block with the highest video-level top-1 (ties: clip-level, then the earlier block).
    ``chance`` = 1 / num_classes. ``model`` is the trained :class:`LinearProbe`.
    ``feature_sizes[b]``: the length of block b's feature vector (what its probe reads);
    ``excluded_test_videos``: test videos left out because they could not be read (path, reason),
    ``num_excluded_test_videos`` their count (``data.on_bad_test_video=exclude``).
    """

    blocks: List[str]
    clip_top1: Dict[str, float]
    video_top1: Dict[str, float]
    train_top1: Dict[str, float]
    train_loss: Dict[str, float]
    best_block: str
    chance: float
    num_classes: int
    num_train: int
    num_test: int
    num_test_videos: int
    seconds: float
    settings: Dict[str, object] = field(default_factory=dict)
    feature_sizes: Dict[str, int] = field(default_factory=dict)
    num_excluded_test_videos: int = 0
    excluded_test_videos: List[Dict[str, str]] = field(default_factory=list)
    model: Optional[LinearProbe] = field(default=None, repr=False, compare=False)

    @property
    def best_top1(self) -> float:
        """Video-level top-1 of the best block."""
        return self.video_top1[self.best_block]

    def to_dict(self) -> Dict[str, object]:
        """Everything but the model, as plain Python values (e.g. for JSON)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "model"}

    def format(self) -> str:
        """A printable table: one row per block, accuracies in percent."""
        width = max(8, *(len(b) for b in self.blocks))
        lines = [
            f"linear probe: {self.num_classes} classes (chance {100 * self.chance:.2f}%), "
            f"{self.num_train} train clips, {self.num_test} test clips of {self.num_test_videos} videos",
            f"{'block':<{width}}  {'clip top-1':>10}  {'video top-1':>11}  {'train top-1':>11}  {'train loss':>10}",
        ]
        for b in self.blocks:
            mark = "  <- best" if b == self.best_block else ""
            lines.append(
                f"{b:<{width}}  {100 * self.clip_top1[b]:>10.2f}  {100 * self.video_top1[b]:>11.2f}  "
                f"{100 * self.train_top1[b]:>11.2f}  {self.train_loss[b]:>10.4f}{mark}"
            )
        lines.append(f"best: {self.best_block} (video top-1 {100 * self.best_top1:.2f}%, "
                     f"clip top-1 {100 * self.clip_top1[self.best_block]:.2f}%)")
        if self.num_excluded_test_videos:
            lines.append(f"{self.num_excluded_test_videos} unreadable test videos excluded (listed in results.json)")
        return "\n".join(lines)


def as_feature_set(data: ProbeData, what: str = "data") -> FeatureSet:
    """A FeatureSet from a FeatureSet, ``(X, y)`` or ``(X, y, index)``.

    ``X``: an (N, D) tensor (one block named ``"features"``) or a dict block -> (N, D); ``y``
    (N,) class indices; ``index`` (N,) video of each row (default: every row its own video).
    """
    if isinstance(data, FeatureSet):
        out = data
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
        x, y = data[0], torch.as_tensor(data[1])
        blocks = dict(x) if isinstance(x, Mapping) else {DEFAULT_BLOCK: x}
        blocks = {k: torch.as_tensor(v) for k, v in blocks.items()}
        n = y.shape[0]
        index = torch.as_tensor(data[2]) if len(data) == 3 else torch.arange(n)
        out = FeatureSet(blocks, index.to(torch.int64), torch.zeros(n, dtype=torch.int64), y.to(torch.int64))
    else:
        raise TypeError(f"{what} must be a FeatureSet, (X, y) or (X, y, index); got {type(data).__name__}")
    if out.label is None:
        raise ValueError(f"{what} has no labels; a probe needs them")
    if len(out) and int(out.label.min()) < 0:
        raise ValueError(f"{what} has negative labels; drop unlabelled rows first")
    return out


def _milestones(epochs: int, milestones: Optional[Sequence[int]]) -> List[int]:
    if milestones is None:
        milestones = [int(round(f * epochs)) for f in PAPER_MILESTONES]
    return sorted({int(m) for m in milestones if 0 < int(m) < epochs})


def _choose_best(blocks: List[str], video: Dict[str, float], clip: Dict[str, float]) -> str:
    return max(blocks, key=lambda b: (video[b], clip[b], -blocks.index(b)))


def train_linear_probe(
    train: ProbeData,
    test: ProbeData,
    *,
    blocks: Optional[Sequence[str]] = None,
    num_classes: Optional[int] = None,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    optimizer: str = "adam",
    momentum: float = 0.9,
    milestones: Optional[Sequence[int]] = None,
    gamma: float = 0.3,
    seed: int = 0,
    standardize: bool = True,
    device: Union[str, torch.device] = "cpu",
    eval_batch_size: int = 8192,
) -> LinearProbeResult:
    """Trains one linear classifier per block on ``train`` and scores them on ``test``.

    Args:
        train, test: a :class:`FeatureSet` (with labels), ``(X, y)`` or ``(X, y, index)``; the
            test set must have the training set's blocks with the same widths.
        blocks: the blocks to probe (default: all of the training set's).
        num_classes: default ``1 + max label`` over both sets.
        epochs, batch_size: passes over the training clips (reshuffled every epoch) and minibatch.
        lr, weight_decay, optimizer, momentum: Adam (default) or SGD with ``momentum``.
        milestones, gamma: the learning rate is multiplied by ``gamma`` after these epochs
            (default: the paper's Kinetics schedule 8, 12, 15, 18 of 20, scaled to ``epochs``;
            ``()`` for a constant rate).
        seed: seeds the minibatch order; the same seed gives the same probes (weights start at 0).
        standardize: standardise features with the training mean / std (default); ``False``
            uses a BatchNorm1d without affine parameters instead.
        device: where the probes train (features are moved there).
        eval_batch_size: rows per forward pass when scoring.
    """
    start_time = time.perf_counter()
    train_set, test_set = as_feature_set(train, "train"), as_feature_set(test, "test")
    blocks = list(blocks) if blocks is not None else train_set.blocks
    for name, data in (("train", train_set), ("test", test_set)):
        missing = [b for b in blocks if b not in data.features]
        if missing:
            raise KeyError(f"{name} set lacks blocks {missing} (it has {data.blocks})")
    dims = {b: train_set.features[b].shape[1] for b in blocks}
    for b in blocks:
        if test_set.features[b].shape[1] != dims[b]:
            raise ValueError(f"block '{b}': train features have {dims[b]} dims, test {test_set.features[b].shape[1]}")
    if len(train_set) == 0 or len(test_set) == 0:
        raise ValueError(f"empty {'train' if len(train_set) == 0 else 'test'} set")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got '{optimizer}'")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs ({epochs}) and batch_size ({batch_size}) must be positive")
    seen = 1 + max(int(train_set.label.max()), int(test_set.label.max()))
    num_classes = seen if num_classes is None else int(num_classes)
    if num_classes < seen:
        raise ValueError(f"num_classes={num_classes} but labels go up to {seen - 1}")

    device = torch.device(device)
    x_train = {b: train_set.features[b].to(device, torch.float32) for b in blocks}
    y_train = train_set.label.to(device)
    model = LinearProbe(dims, num_classes, standardize).to(device)
    model.set_statistics(x_train)
    params = list(model.parameters())
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, _milestones(epochs, milestones), gamma=gamma)
    generator = torch.Generator().manual_seed(int(seed))

    n = len(train_set)
    losses = torch.zeros(len(blocks), dtype=torch.float64, device=device)
    for _ in range(epochs):
        model.train()
        losses.zero_()
        count = 0
        order = torch.randperm(n, generator=generator).to(device)
        for first in range(0, n, batch_size):
            rows = order[first:first + batch_size]
            if rows.numel() < 2 and not standardize:
                continue  # BatchNorm cannot normalise a batch of one
            target = y_train[rows]
            terms = [F.cross_entropy(model.block_logits(i, x_train[b][rows]), target) for i, b in enumerate(blocks)]
            loss = torch.stack(terms).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses += torch.stack(terms).detach().double() * rows.numel()
            count += rows.numel()
        schedule.step()
    train_loss = (losses / max(count, 1)).tolist()

    model.eval()
    train_top1, _ = _score(model, blocks, train_set, device, eval_batch_size)
    clip_top1, video_top1 = _score(model, blocks, test_set, device, eval_batch_size)
    return LinearProbeResult(
        blocks=blocks,
        clip_top1=clip_top1,
        video_top1=video_top1,
        train_top1=train_top1,
        train_loss=dict(zip(blocks, train_loss)),
        best_block=_choose_best(blocks, video_top1, clip_top1),
        chance=1.0 / num_classes,
        num_classes=num_classes,
        num_train=len(train_set),
        num_test=len(test_set),
        num_test_videos=test_set.num_videos,
        seconds=time.perf_counter() - start_time,
        settings=dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, optimizer=optimizer,
                      momentum=momentum, milestones=_milestones(epochs, milestones), gamma=gamma, seed=seed,
                      standardize=standardize),
        model=model.cpu(),
    )


@torch.no_grad()
def predict_proba(model: LinearProbe, data: FeatureSet, device: Union[str, torch.device] = "cpu",
                  batch_size: int = 8192) -> Dict[str, torch.Tensor]:
    """Softmax probabilities (N, classes) per block of a trained probe on ``data`` (CPU float32)."""
    model.eval()
    out: Dict[str, List[torch.Tensor]] = {b: [] for b in model.blocks}
    for first in range(0, len(data), batch_size):
        for i, b in enumerate(model.blocks):
            x = data.features[b][first:first + batch_size].to(device, torch.float32)
            out[b].append(model.block_logits(i, x).softmax(dim=1).cpu())
    return {b: torch.cat(v) if v else torch.zeros(0, model.num_classes) for b, v in out.items()}


def _score(model: LinearProbe, blocks: List[str], data: FeatureSet, device, batch_size: int):
    probs = predict_proba(model, data, device, batch_size)
    label, index = data.label.cpu(), data.index.cpu()
    clip, video = {}, {}
    for b in blocks:
        clip[b] = float((probs[b].argmax(dim=1) == label).double().mean())
        video[b] = video_level_accuracy(probs[b], index, label)
    return clip, video
