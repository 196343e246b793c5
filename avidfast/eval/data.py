"""Labelled data for the evaluation protocols: train / test manifests, their loaders, the device.

A protocol reads a training manifest and a test manifest with labels (or one manifest split by
video, stratified per class: :func:`stratified_split`, also the demo's split). Class indices are
positions in the training manifest's ``Manifest.classes`` (every protocol, the memory probe
included); the test manifest is indexed with the same classes, so a label missing from training is
an error.
"""
import logging
from dataclasses import dataclass
from typing import List, Optional

import torch

from avidfast.data.manifest import Manifest, ManifestError, read_manifest
from avidfast.errors import EvalError
from avidfast.eval.config import EvalConfig

log = logging.getLogger("avidfast")


@dataclass
class LabelledSplit:
    """Training and test manifests of one protocol, and the class names (index = position)."""

    train: Manifest
    test: Manifest
    classes: List[str]


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int):
    """Per class, ``round(test_fraction * n_c)`` videos (at least one and at most ``n_c - 1`` when
    ``n_c > 1``), drawn with a generator seeded by ``seed``, go to the test side. ``labels`` (N,)
    int64 -> (train_rows, test_rows), each sorted int64. The one stratified split of avidfast."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        n_test = int(round(test_fraction * rows.numel()))
        if rows.numel() > 1:
            n_test = min(max(n_test, 1), rows.numel() - 1)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _subset(manifest: Manifest, rows: torch.Tensor) -> Manifest:
    return Manifest(manifest.root, [manifest.rows[i] for i in rows.tolist()], list(manifest.columns))


def labelled_split(cfg: EvalConfig) -> LabelledSplit:
    """The train / test manifests of ``cfg.data`` (raises ManifestError naming the file)."""
    d = cfg.data
    train = read_manifest(d.train_manifest, d.root)
    if not train.has_labels:
        raise ManifestError(f"{d.train_manifest}: the evaluation needs a 'label' on every row")
    classes = train.classes
    if len(classes) < 2:
        raise ManifestError(f"{d.train_manifest}: needs at least 2 classes, has {len(classes)}")
    if d.test_manifest:
        test = read_manifest(d.test_manifest, d.root)
        if not test.has_labels:
            raise ManifestError(f"{d.test_manifest}: the evaluation needs a 'label' on every row")
        try:
            test.label_indices(classes)
        except ManifestError as error:
            raise ManifestError(f"{d.test_manifest}: {error}") from None
        return LabelledSplit(train, test, classes)
    labels = torch.tensor(train.label_indices())
    train_rows, test_rows = stratified_split(labels, d.test_fraction, cfg.seed)
    log.info("no test manifest: %d of %d videos of %s held out (stratified, seed %d)", test_rows.numel(),
             len(train), d.train_manifest, cfg.seed)
    return LabelledSplit(_subset(train, train_rows), _subset(train, test_rows), classes)


def _audio(cfg: EvalConfig):
    from avidfast.data.audio import SpectrogramStats, get_preset

    preset = get_preset(cfg.data.audio.preset)
    stats = SpectrogramStats.load(cfg.data.audio.stats, preset) if cfg.data.audio.stats else None
    return preset, stats


def train_loader(cfg: EvalConfig, split: LabelledSplit, rank: int = 0, world: int = 1):
    """Augmented training clips of ``split.train`` (Table 4 augmentation of ``cfg.data.video``),
    ``cfg.optim.samples_per_epoch`` per epoch, batches of ``cfg.optim.batch_size`` per process."""
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader

    preset, stats = _audio(cfg)
    dataset = ClipDataset(split.train, video=cfg.data.video.to_video_config(), audio_preset=preset, stats=stats,
                          mode="train", seed=cfg.seed, classes=split.classes)
    return CPULoader(dataset, batch_size=cfg.optim.batch_size, workers=cfg.data.workers, rank=rank,
                     world_size=world, samples_per_epoch=cfg.optim.samples_per_epoch,
                     max_bad_fraction=cfg.data.max_bad_fraction)


def test_loader(cfg: EvalConfig, manifest: Manifest, classes: Optional[List[str]], rank: int = 0, world: int = 1,
                batch_size: Optional[int] = None):
    """``cfg.data.clips_per_video`` evenly spaced, centre-cropped clips of every video of ``manifest``
    (this rank's share), in order, every batch with ``clip`` and, with ``classes``, ``label``."""
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader

    preset, stats = _audio(cfg)
    dataset = ClipDataset(manifest, video=cfg.data.video.to_video_config(), audio_preset=preset, stats=stats,
                          mode="eval", clips_per_video=cfg.data.clips_per_video, seed=cfg.seed, classes=classes)
    return CPULoader(dataset, batch_size=batch_size or cfg.optim.batch_size, workers=cfg.data.workers, rank=rank,
                     world_size=world, drop_last=False, max_bad_fraction=cfg.data.max_bad_fraction)


def resolve_device(name: str, option: str = "run.device") -> torch.device:
    """``auto`` -> this process's GPU when CUDA is visible (cuda:LOCAL_RANK under torchrun), else CPU;
    ``cuda`` without an index -> this process's GPU too (torch.cuda.set_device needs an index).

    A name that is not a device, or a CUDA device that is not visible, raises EvalError naming
    ``option``: a config key (``run.device=cuda: ...; use --set run.device=cpu``) or a command-line
    option starting with ``--`` (``--device cuda: ...; use --device cpu``).
    """
    import os

    where, cpu = (f"{option} {name}", f"{option} cpu") if option.startswith("--") else (
        f"{option}={name}", f"--set {option}=cpu")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"{where}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"{where}: no CUDA device is visible; use {cpu}")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise EvalError(f"{where}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bfloat16 for ``bf16`` (and ``auto`` on a GPU that supports it), else ``None`` (fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None
