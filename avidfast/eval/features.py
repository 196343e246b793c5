"""Frozen-encoder features per block, and video-level aggregation of clip scores.

:func:`extract_features` runs an encoder over an evaluation loader (the batch contract of
``avidfast.data``: dicts with ``video`` / ``audio``, ``index``, optional ``label`` and ``clip``)
and global-pools every block's feature map over its non-channel dimensions, giving one
(N_clips, C) float32 matrix per block in a :class:`FeatureSet`.

The encoder is any ``torch.nn.Module`` with a ``features(x) -> Dict[str, Tensor]`` method whose
values are (B, C, ...) maps (video (B, C, T, H, W), audio (B, C, F, T)) or already pooled (B, C)
vectors. A model holding ``.video`` / ``.audio`` encoders may be passed as it is: the encoder of
the requested modality is used.

Clips of one video share its ``index`` (the manifest row); :func:`video_level` averages clip
scores per video and :func:`video_level_accuracy` turns them into video-level top-1.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

MODALITIES = ("video", "audio")
POOLS = ("max", "mean")


@dataclass
class FeatureSet:
    """Pooled features of N clips: ``features[block]`` (N, C_block) float32, row r from clip r.

    ``index`` (N,) int64: the clip's video (manifest row / memory slot); ``clip`` (N,) int64: the
    clip's number within its video; ``label`` (N,) int64 class, or ``None`` without labels.
    """

    features: Dict[str, torch.Tensor]
    index: torch.Tensor
    clip: torch.Tensor
    label: Optional[torch.Tensor] = None
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not self.features:
            raise ValueError("a FeatureSet needs at least one block of features")
        n = self.index.shape[0] if self.index.dim() == 1 else -1
        if n < 0:
            raise ValueError(f"index must be 1-D, got shape {tuple(self.index.shape)}")
        for name, value in self.features.items():
            if value.dim() != 2 or value.shape[0] != n:
                raise ValueError(f"block '{name}': features must be (N={n}, C), got {tuple(value.shape)}")
        for name in ("clip", "label"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(f"{name} must be ({n},), got {tuple(value.shape)}")

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def blocks(self) -> List[str]:
        """Block names, in the encoder's order."""
        return list(self.features)

    @property
    def num_videos(self) -> int:
        return int(torch.unique(self.index).numel())

    def select(self, rows: torch.Tensor) -> "FeatureSet":
        """The clips ``rows`` (int64 positions or a bool mask of length N), as a new FeatureSet."""
        return FeatureSet(
            {k: v[rows] for k, v in self.features.items()}, self.index[rows], self.clip[rows],
            None if self.label is None else self.label[rows], dict(self.meta),
        )

    def save(self, path: str) -> None:
        """Writes the set with torch.save (tensors and plain types only)."""
        torch.save({"features": self.features, "index": self.index, "clip": self.clip, "label": self.label,
                    "meta": self.meta}, path)

    @classmethod
    def load(cls, path: str) -> "FeatureSet":
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["features"], state["index"], state["clip"], state["label"], state.get("meta") or {})


def pool_map(x: torch.Tensor, pool: str = "max") -> torch.Tensor:
    """(B, C, ...) -> (B, C): max (or mean) over every non-channel dimension; (B, C) is kept."""
    if x.dim() < 2:
        raise ValueError(f"a feature map must be (B, C, ...), got shape {tuple(x.shape)}")
    if x.dim() == 2:
        return x
    flat = x.flatten(2)
    if pool == "max":
        return flat.amax(dim=2)
    if pool == "mean":
        return flat.mean(dim=2, dtype=torch.float32)
    raise ValueError(f"pool must be one of {POOLS}, got '{pool}'")


def _encoder_for(encoder: torch.nn.Module, modality: str) -> torch.nn.Module:
    if hasattr(encoder, "features"):
        return encoder
    inner = getattr(encoder, modality, None)
    if isinstance(inner, torch.nn.Module) and hasattr(inner, "features"):
        return inner
    raise TypeError(
        f"{type(encoder).__name__} has no features(x) method (nor a .{modality} encoder with one); "
        "extract_features needs an encoder whose features(x) returns a dict of per-block maps"
    )


def extract_features(
    encoder: torch.nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    modality: str = "video",
    blocks: Optional[Sequence[str]] = None,
    device: Union[str, torch.device] = "cpu",
    pool: str = "max",
    progress: bool = True,
    autocast: bool = False,
) -> FeatureSet:
    """Runs the frozen ``encoder`` over ``loader`` and returns every clip's pooled block features.

    Args:
        encoder: a module with ``features(x) -> Dict[str, Tensor]`` (or a model with a
            ``.video`` / ``.audio`` such encoder). It must already be on ``device``; it runs in
            eval mode under ``torch.no_grad`` and its train/eval mode is restored afterwards.
        loader: iterable of batch dicts (e.g. a ``CPULoader`` in ``mode="eval"``): the input
            under ``batch[modality]``, ``index`` (B,), optional ``label`` and ``clip`` (B,).
        modality: ``"video"`` or ``"audio"``: which input of the batch the encoder reads.
        blocks: block names to keep, in order (default: every block ``features`` returns).
        device: where the inputs are moved before the forward pass.
        pool: ``"max"`` (the paper's) or ``"mean"`` over the non-channel dimensions.
        progress: shows a tqdm bar.
        autocast: runs the forward pass under bfloat16 autocast (off by default; features are
            returned as float32 either way).

    Returns:
        a :class:`FeatureSet`: per block a float32 (N_clips, C) CPU tensor, plus ``index``,
        ``clip`` (zeros when the loader gives none) and ``label`` (``None`` when it gives none),
        in the loader's order.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got '{modality}'")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got '{pool}'")
    encoder = _encoder_for(encoder, modality)
    device = torch.device(device)
    chunks: Dict[str, List[torch.Tensor]] = {}
    index: List[torch.Tensor] = []
    clip: List[torch.Tensor] = []
    label: List[torch.Tensor] = []
    order: Optional[List[str]] = None
    bar = None
    iterator = loader
    if progress:
        from tqdm import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        iterator = bar = tqdm(loader, total=total, desc=f"{modality} features", unit="batch")

    was_training = encoder.training
    encoder.eval()
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with torch.no_grad():
            for batch in iterator:
                if modality not in batch or "index" not in batch:
                    raise KeyError(f"batch has keys {sorted(batch)}; extract_features needs '{modality}' and 'index'")
                x = batch[modality].to(device, non_blocking=True)
                with cast:
                    maps = encoder.features(x)
                if order is None:
                    order = list(maps) if blocks is None else list(blocks)
                    missing = [b for b in order if b not in maps]
                    if missing:
                        raise KeyError(f"blocks {missing} not produced by the encoder (it gives {list(maps)})")
                    chunks = {b: [] for b in order}
                for b in order:
                    chunks[b].append(pool_map(maps[b], pool).float().cpu())
                n = x.shape[0]
                batch_index = batch["index"].reshape(-1).to(torch.int64).cpu()
                if batch_index.numel() != n:
                    raise ValueError(f"batch has {n} inputs but {batch_index.numel()} indices")
                index.append(batch_index)
                clip.append(batch["clip"].reshape(-1).to(torch.int64).cpu() if "clip" in batch
                            else torch.zeros(n, dtype=torch.int64))
                if "label" in batch and batch["label"] is not None:
                    label.append(batch["label"].reshape(-1).to(torch.int64).cpu())
    finally:
        encoder.train(was_training)
        if bar is not None:
            bar.close()
    if order is None:
        raise ValueError("the loader yielded no batches")
    if label and len(label) != len(index):
        raise ValueError("some batches have labels and others do not")
    return FeatureSet(
        {b: torch.cat(chunks[b]) for b in order},
        torch.cat(index),
        torch.cat(clip),
        torch.cat(label) if label else None,
        {"modality": modality, "pool": pool},
    )


def video_level(scores: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Averages clip scores per video.

    Args:
        scores: (N, C) clip scores (e.g. softmax probabilities).
        index: (N,) video of every clip.

    Returns:
        ``videos`` (V,) the distinct indices in increasing order, and ``mean`` (V, C) the average
        of the scores of each video's clips (accumulated in float64, returned in scores' dtype).
    """
    if scores.dim() != 2 or index.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (N, C) and index (N,), got {tuple(scores.shape)} and {tuple(index.shape)}")
    videos, inverse = torch.unique(index, sorted=True, return_inverse=True)
    sums = torch.zeros(videos.numel(), scores.shape[1], dtype=torch.float64, device=scores.device)
    sums.index_add_(0, inverse, scores.to(torch.float64))
    counts = torch.bincount(inverse, minlength=videos.numel()).to(torch.float64)
    return videos, (sums / counts[:, None]).to(scores.dtype)


def video_labels(label: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(videos (V,), label (V,)): each video's label; raises if its clips disagree."""
    videos, inverse = torch.unique(index, sorted=True, return_inverse=True)
    low = torch.full((videos.numel(),), torch.iinfo(torch.int64).max, dtype=torch.int64, device=label.device)
    high = torch.full_like(low, torch.iinfo(torch.int64).min)
    low = low.scatter_reduce(0, inverse, label.to(torch.int64), "amin")
    high = high.scatter_reduce(0, inverse, label.to(torch.int64), "amax")
    bad = (low != high).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"clips of video {int(videos[bad[0]])} have different labels")
    return videos, low


def video_level_accuracy(scores: torch.Tensor, index: torch.Tensor, label: torch.Tensor) -> float:
    """Top-1 of the per-video mean of clip ``scores`` (N, C) against the videos' labels."""
    _, mean = video_level(scores, index)
    _, target = video_labels(label, index)
    return float((mean.argmax(dim=1) == target.to(mean.device)).double().mean())
