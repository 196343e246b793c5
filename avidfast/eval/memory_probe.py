"""Linear probes on memory-bank rows (the supplement's Table 2, "CMA calibration").

The memory banks hold one video and one audio embedding per training instance. A linear
classifier is trained on the rows of a random ``train_fraction`` of the labelled instances (video
rows, audio rows, and both concatenated) and scored on the others; the split is drawn again
``repeats`` times (split r seeded by ``(seed, r)``) and the top-1 is reported as mean +- std.
The three kinds are trained together as independent blocks of
:func:`avidfast.eval.linear_probe.train_linear_probe`.
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from avidfast.errors import EvalError
from avidfast.eval.features import FeatureSet
from avidfast.eval.linear_probe import train_linear_probe

KINDS = ("video", "audio", "combined")
TITLES = {"video": "Video Mem", "audio": "Audio Mem", "combined": "Combined Mem"}


@dataclass
class MemoryProbeResult:
    """Per feature kind (``video``, ``audio``, ``combined``): top-1 (fraction) of every repeat.

    ``mean`` / ``std``: over the repeats (``std`` is the sample standard deviation, 0 for one
    repeat). ``splits[r]`` = (train rows, validation rows) of repeat r, as bank row indices.
    """

    kinds: List[str]
    top1: Dict[str, List[float]]
    mean: Dict[str, float]
    std: Dict[str, float]
    splits: List[Tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    chance: float
    num_classes: int
    num_rows: int
    seconds: float
    settings: Dict[str, object] = field(default_factory=dict)

    @property
    def repeats(self) -> int:
        return len(self.splits)

    def to_dict(self) -> Dict[str, object]:
        """Accuracies and settings as plain Python values (the splits left out)."""
        return {"kinds": self.kinds, "top1": self.top1, "mean": self.mean, "std": self.std, "chance": self.chance,
                "num_classes": self.num_classes, "num_rows": self.num_rows, "repeats": self.repeats,
                "seconds": self.seconds, "settings": self.settings}

    def format(self) -> str:
        """The supplement's Table 2 layout: mean +- std of top-1 in percent per memory kind."""
        titles = [TITLES.get(k, k) for k in self.kinds]
        cells = [f"{100 * self.mean[k]:.2f} \u00b1 {100 * self.std[k]:.2f}" for k in self.kinds]
        widths = [max(len(t), len(c)) for t, c in zip(titles, cells)]
        head = "  ".join(f"{t:>{w}}" for t, w in zip(titles, widths))
        row = "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
        train = self.settings.get("train_fraction", 0.7)
        return "\n".join([
            f"memory probe: {self.num_rows} rows, {self.num_classes} classes (chance {100 * self.chance:.2f}%), "
            f"{self.repeats} random {round(100 * train)}/{round(100 * (1 - train))} splits, top-1 %",
            head, row,
        ])


def split_rows(num_rows: int, train_fraction: float, seed: int, repeat: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) row positions of repeat ``repeat``: a random permutation seeded by
    (seed, repeat), its first ``round(train_fraction * num_rows)`` rows for training, both sorted.
    A fraction outside (0, 1), or one that leaves a side empty, raises EvalError."""
    if not 0 < train_fraction < 1:
        raise EvalError(f"train_fraction must be in (0, 1), got {train_fraction}")
    num_train = int(round(train_fraction * num_rows))
    if not 0 < num_train < num_rows:
        raise EvalError(f"{num_rows} rows cannot be split {train_fraction:.2f}/{1 - train_fraction:.2f} "
                         "with both parts non-empty")
    key = int(np.random.SeedSequence([int(seed), int(repeat), 0x3E3]).generate_state(1, np.uint64)[0] >> 1)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(key))
    return order[:num_train].sort().values, order[num_train:].sort().values


def memory_probe(
    video_bank: torch.Tensor,
    audio_bank: torch.Tensor,
    labels: Union[torch.Tensor, Sequence[int]],
    *,
    repeats: int = 5,
    train_fraction: float = 0.7,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    num_classes: Optional[int] = None,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    optimizer: str = "adam",
    standardize: bool = True,
    device: Union[str, torch.device] = "cpu",
) -> MemoryProbeResult:
    """Linear-probe accuracy of memory rows, mean +- std over ``repeats`` random splits.

    Args:
        video_bank, audio_bank: (N, D_v), (N, D_a) memory rows (any float dtype; row i of both
            is instance i).
        labels: (N,) class of every row; rows with a negative label are left out (unlabelled).
        repeats, train_fraction, seed: ``repeats`` random splits, ``train_fraction`` of the
            labelled rows for training, split r drawn from (seed, r) (so the same seed gives the
            same splits and the same accuracies).
        kinds: which of ``"video"``, ``"audio"``, ``"combined"`` (the two rows concatenated).
        num_classes: default ``1 + max label``.
        epochs, lr, weight_decay, batch_size, optimizer, standardize, device: passed to
            :func:`~avidfast.eval.linear_probe.train_linear_probe` (the probe's seed is the
            split's: ``seed * 1000 + r``).
    """
    start_time = time.perf_counter()
    labels = torch.as_tensor(labels).to(torch.int64).cpu()
    if video_bank.dim() != 2 or audio_bank.dim() != 2:
        raise ValueError(f"banks must be (N, D), got {tuple(video_bank.shape)} and {tuple(audio_bank.shape)}")
    n = video_bank.shape[0]
    if audio_bank.shape[0] != n or labels.shape != (n,):
        raise ValueError(f"video bank ({video_bank.shape[0]} rows), audio bank ({audio_bank.shape[0]} rows) "
                         f"and labels {tuple(labels.shape)} must have the same N")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    labelled = (labels >= 0).nonzero().flatten()
    if labelled.numel() < 2:
        raise ValueError("fewer than 2 labelled rows")
    seen = 1 + int(labels.max())
    num_classes = seen if num_classes is None else int(num_classes)

    video = video_bank.detach().to("cpu", torch.float32)[labelled]
    audio = audio_bank.detach().to("cpu", torch.float32)[labelled]
    y = labels[labelled]
    features = {}
    if "video" in kinds:
        features["video"] = video
    if "audio" in kinds:
        features["audio"] = audio
    if "combined" in kinds:
        features["combined"] = torch.cat([video, audio], dim=1)
    features = {k: features[k] for k in kinds}
    rows = torch.arange(y.numel())
    full = FeatureSet(features, rows, torch.zeros_like(rows), y)

    top1: Dict[str, List[float]] = {k: [] for k in kinds}
    splits = []
    for r in range(repeats):
        train_pos, val_pos = split_rows(y.numel(), train_fraction, seed, r)
        result = train_linear_probe(
            full.select(train_pos), full.select(val_pos), num_classes=num_classes, epochs=epochs, lr=lr,
            weight_decay=weight_decay, batch_size=batch_size, optimizer=optimizer, seed=seed * 1000 + r,
            standardize=standardize, device=device,
        )
        for k in kinds:
            top1[k].append(result.clip_top1[k])
        splits.append((labelled[train_pos], labelled[val_pos]))
    return MemoryProbeResult(
        kinds=list(kinds),
        top1=top1,
        mean={k: statistics.fmean(v) for k, v in top1.items()},
        std={k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in top1.items()},
        splits=splits,
        chance=1.0 / num_classes,
        num_classes=num_classes,
        num_rows=int(y.numel()),
        seconds=time.perf_counter() - start_time,
        settings=dict(repeats=repeats, train_fraction=train_fraction, seed=seed, epochs=epochs, lr=lr,
                      weight_decay=weight_decay, batch_size=batch_size, optimizer=optimizer, standardize=standardize),
    )
