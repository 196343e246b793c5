"""Labelled data for the evaluation protocols: train / test manifests, their loaders, the device.

A protocol reads a training manifest and a test manifest with labels (or one manifest split by
video, stratified per class: :func:`stratified_split`, also the demo's split). Class indices are
positions in the training manifest's ``Manifest.classes`` (every protocol, the memory probe
included); the test manifest is indexed with the same classes, so a label missing from training is
an error.
"""
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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


def train_loader(cfg: EvalConfig, split: LabelledSplit, rank: int = 0, world: int = 1):
    """Augmented training clips of ``split.train`` (Table 4 augmentation of ``cfg.data.video``),
    ``cfg.optim.samples_per_epoch`` per epoch, batches of ``cfg.per_process_batch(world)`` per process.
    Video only (no audio is decoded; files without sound are fine); clips of videos shorter than a
    clip are padded by repeating their frames (the reference's evaluation clips); an unreadable
    video is replaced as in pre-training (``cfg.data.max_bad_fraction``)."""
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader

    dataset = ClipDataset(split.train, video=cfg.data.video.to_video_config(), mode="train", seed=cfg.seed,
                          classes=split.classes, audio=False, pad_short=True)
    return CPULoader(dataset, batch_size=cfg.per_process_batch(world), workers=cfg.data.workers, rank=rank,
                     world_size=world, samples_per_epoch=cfg.optim.samples_per_epoch,
                     max_bad_fraction=cfg.data.max_bad_fraction)


def _audio(cfg: EvalConfig):
    from avidfast.data.audio import SpectrogramStats, get_preset

    preset = get_preset(cfg.data.audio.preset)
    stats = SpectrogramStats.load(cfg.data.audio.stats, preset) if cfg.data.audio.stats else None
    return preset, stats


def test_loader(cfg: EvalConfig, manifest: Manifest, classes: Optional[List[str]], rank: int = 0, world: int = 1,
                batch_size: Optional[int] = None, audio: bool = False):
    """``cfg.data.clips_per_video`` evenly spaced, centre-cropped clips of every video of ``manifest``
    (this rank's share), in order, every batch with ``clip`` and, with ``classes``, ``label``. Video
    only, short videos padded (as :func:`train_loader`), unless ``audio`` (the cross-modal retrieval:
    spectrograms of ``cfg.data.audio`` too, no padding). A video is never replaced: an unreadable one
    stops the run naming it, or with ``data.on_bad_test_video=exclude`` is left out (the loader's
    ``bad_videos`` / ``bad_files``; :func:`scored_test_clips` drops its clips)."""
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader

    preset, stats = _audio(cfg) if audio else ("table5", None)
    dataset = ClipDataset(manifest, video=cfg.data.video.to_video_config(), audio_preset=preset, stats=stats,
                          mode="eval", clips_per_video=cfg.data.clips_per_video, seed=cfg.seed, classes=classes,
                          audio=audio, pad_short=not audio)
    return CPULoader(dataset, batch_size=batch_size or cfg.per_process_batch(world), workers=cfg.data.workers, rank=rank,
                     world_size=world, drop_last=False, on_bad=cfg.data.on_bad_test_video)


@dataclass
class ScoredTest:
    """The test clips that count, gathered from every process: ``scores`` (N, C) per name, ``index``
    and ``label`` (N,); ``excluded``: (path, reason) of the test videos left out (sorted by path)."""

    scores: Dict[str, torch.Tensor]
    index: torch.Tensor
    label: torch.Tensor
    excluded: List[Tuple[str, str]]

    @property
    def num_videos(self) -> int:
        return int(self.index.unique().numel())

    def summary(self) -> Dict[str, object]:
        """What results.json says about the test set: videos scored, clips, and the excluded ones."""
        return {"num_test": int(self.index.numel()), "num_test_videos": self.num_videos,
                "num_excluded_test_videos": len(self.excluded),
                "excluded_test_videos": [{"path": p, "reason": r} for p, r in self.excluded]}


def scored_test_clips(loader, manifest: Manifest, clips_per_video: int, scores: Dict[str, torch.Tensor],
                      index: torch.Tensor, label: torch.Tensor) -> ScoredTest:
    """Gathers this process's test ``scores`` (name -> (n, C)), ``index`` and ``label`` (n,) from every
    process, drops the clips of videos the loader excluded (anywhere in the run) and checks that every
    other video of ``manifest`` is scored exactly once: ``clips_per_video`` clips, no more, no fewer
    (EvalError otherwise: a video scored twice or missing would bias video top-1)."""
    import torch.distributed as dist

    from avidfast.distributed import all_gather_rows, is_distributed

    names = list(scores)
    gathered = all_gather_rows([index, label] + [scores[n] for n in names])
    index_all, label_all, rest = gathered[0], gathered[1], gathered[2:]
    excluded = list(loader.bad_files)
    bad = list(loader.bad_videos)
    if is_distributed():
        everyone: List[object] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (excluded, bad))
        excluded = [e for part in everyone for e in part[0]]
        bad = [b for part in everyone for b in part[1]]
    keep = ~torch.isin(index_all, torch.tensor(bad, dtype=index_all.dtype))
    index_all, label_all = index_all[keep], label_all[keep]
    rest = [r[keep] for r in rest]
    expected = sorted(set(range(len(manifest))) - set(bad))
    videos, counts = index_all.unique(return_counts=True)
    if videos.tolist() != expected or bool((counts != clips_per_video).any()):
        raise EvalError(f"the test scores cover {videos.numel()} videos with {counts.min() if counts.numel() else 0}.."
                        f"{counts.max() if counts.numel() else 0} clips each, expected each of the "
                        f"{len(expected)} readable test videos exactly once with {clips_per_video} clips")
    return ScoredTest(dict(zip(names, rest)), index_all, label_all, sorted(excluded))


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
