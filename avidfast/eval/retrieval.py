"""Cross-modal retrieval and k-NN classification from a pre-trained model's embeddings.

Beyond the paper's protocols: how well the learned video and audio embeddings
(:meth:`AVModel.embed_video` / :meth:`AVModel.embed_audio`, unit norm) find each other, and how
well they classify held-out videos without training anything.

Definitions (every similarity is cosine: rows are L2-normalised first):

* **Video level.** A video with several clips gets one video embedding and one audio embedding:
  the mean of its clips' embeddings of that modality, re-normalised. Retrieval and k-NN both work
  on these, so a query is a video and its correct answer is the same video in the other modality.
* **Recall@k** (``v2a``): the share of videos whose own audio embedding is among the k audio
  embeddings most similar to its video embedding, every video of the set being a candidate;
  ``a2v`` the other way round. **Ties count against the query**: the true pair is ranked after
  every other candidate with the same similarity, so the rank of query i is
  ``#{j != i : s_ij >= s_ii}`` (0-based) whatever the row order, and a collapsed network (all
  embeddings equal) scores 0 rather than chance. The chance level of a random ranking is
  ``min(k, N) / N``. The median rank is 1-based.
* **Class-level precision@1** (``v2a``): the share of videos whose nearest audio embedding,
  among every *other* video's, comes from a video of the same class; ``a2v`` the other way round.
  Ties count against the query (a tie between a same-class and an other-class candidate is a
  miss). Its chance level is the mean over queries of ``(n_c - 1) / (N - 1)``, ``n_c`` the
  number of videos of the query's class.
* **k-NN** (the weighted k-NN of instance-discrimination papers, Wu et al. 2018): each test
  video's k most similar training videos (ties: the training video of lower manifest row first)
  vote for their class with weight ``exp(s / temperature)``; the class with the largest total wins
  (ties: the lowest class index). Top-1 is reported for video embeddings, audio embeddings and
  ``combined`` (the two concatenated, whose cosine is the mean of the two cosines).
"""
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from avidfast.eval.features import video_labels, video_level

DIRECTIONS = {"v2a": "video -> audio", "a2v": "audio -> video"}


@dataclass
class ClipEmbeddings:
    """Embeddings of N clips: ``video`` (N, D) and ``audio`` (N, D) float (``None`` when only the
    video was embedded), row r from clip r; ``index`` (N,) int64 the clip's video (manifest row);
    ``label`` (N,) int64 class or ``None``."""

    video: torch.Tensor
    audio: Optional[torch.Tensor]
    index: torch.Tensor
    label: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.video.dim() != 2 or (self.audio is not None and (self.audio.dim() != 2
                                                                 or self.video.shape != self.audio.shape)):
            raise ValueError(f"video and audio embeddings must both be (N, D), got {tuple(self.video.shape)} "
                             f"and {None if self.audio is None else tuple(self.audio.shape)}")
        n = self.video.shape[0]
        if tuple(self.index.shape) != (n,):
            raise ValueError(f"index must be ({n},), got {tuple(self.index.shape)}")
        if self.label is not None and tuple(self.label.shape) != (n,):
            raise ValueError(f"label must be ({n},), got {tuple(self.label.shape)}")

    def __len__(self) -> int:
        """N, the number of clips."""
        return self.video.shape[0]

    def per_video(self) -> "ClipEmbeddings":
        """One row per distinct ``index``, in increasing index order: each modality's clip
        embeddings averaged (in float64) and re-normalised; the video's label (its clips must agree)."""
        videos, video = video_level(self.video, self.index)
        audio = None if self.audio is None else F.normalize(video_level(self.audio, self.index)[1], dim=1)
        label = None if self.label is None else video_labels(self.label, self.index)[1]
        return ClipEmbeddings(F.normalize(video, dim=1), audio, videos, label)


def embed_clips(model: torch.nn.Module, loader: Iterable[Mapping[str, torch.Tensor]],
                device: Union[str, torch.device] = "cpu", progress: bool = True,
                audio: bool = True) -> ClipEmbeddings:
    """Embeds every clip of ``loader`` with ``model`` (an AVModel, already on ``device``).

    Each batch needs ``video`` (B, 3, T, H, W), ``audio`` (B, 1, F, T) (not with ``audio=False``:
    the video alone is embedded and the result's ``audio`` is None) and ``index`` (B,); a
    ``label`` (B,) is kept when every batch has one. The model runs in eval mode under
    ``torch.no_grad`` and its train/eval mode is restored afterwards. Returns float32 CPU
    embeddings (N, D) in the loader's order (unit norm, as ``embed_video`` / ``embed_audio`` give).
    """
    device = torch.device(device)
    with_audio = audio
    video, audio, index, label = [], [], [], []
    iterator = loader
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        iterator = bar = tqdm(loader, total=total, desc="embeddings", unit="batch")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iterator:
                missing = [k for k in ("video", "audio", "index") if k not in batch and (with_audio or k != "audio")]
                if missing:
                    raise KeyError(f"batch has keys {sorted(batch)}; embed_clips needs {missing} too")
                video.append(model.embed_video(batch["video"].to(device, non_blocking=True)).float().cpu())
                if with_audio:
                    audio.append(model.embed_audio(batch["audio"].to(device, non_blocking=True)).float().cpu())
                index.append(batch["index"].reshape(-1).to(torch.int64).cpu())
                if batch.get("label") is not None:
                    label.append(batch["label"].reshape(-1).to(torch.int64).cpu())
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if not video:
        raise ValueError("the loader yielded no batches")
    if label and len(label) != len(index):
        raise ValueError("some batches have labels and others do not")
    return ClipEmbeddings(torch.cat(video), torch.cat(audio) if with_audio else None, torch.cat(index),
                          torch.cat(label) if label else None)


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """(N, D) float rows, L2-normalised; float64 stays float64, other floats become float32."""
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=1)


def _check_ks(ks: Sequence[int]) -> List[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be one or more positive integers, got {list(ks)}")
    return ks


def true_pair_ranks(queries: torch.Tensor, candidates: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of ``candidates[i]`` among all candidates for ``queries[i]``, by descending
    dot product, ties against the query: ``#{j != i : <q_i, c_j> >= <q_i, c_i>}``.

    ``queries``, ``candidates``: (N, D) (already normalised for cosine). Returns (N,) int64 on
    the inputs' device; ``chunk`` queries are scored at a time (memory ``chunk x N``).
    """
    n = queries.shape[0]
    ranks = torch.empty(n, dtype=torch.int64, device=queries.device)
    for start in range(0, n, chunk):
        sims = queries[start:start + chunk] @ candidates.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        own = sims[rows, start + rows]
        ranks[start:start + sims.shape[0]] = (sims >= own[:, None]).sum(dim=1) - 1
    return ranks


def cross_modal_recall(video: torch.Tensor, audio: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                       index: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Video-to-audio and audio-to-video recall@k (module docstring for the definitions).

    Args:
        video, audio: (N, D) embeddings (any scale: rows are normalised); row r of both come from
            the same clip. float64 is kept, other floats are scored in float32.
        ks: the k of recall@k (positive; a k >= the number of videos gives 1).
        index: (N,) video of every row; rows sharing an index are averaged per modality (and
            re-normalised) into one video first. ``None``: every row is its own video.

    Returns:
        ``{"num_queries": V, "ks": [...], "v2a": {"R@k": fraction}, "a2v": {...},
        "median_rank": {"v2a": r, "a2v": r} (1-based), "chance": {"R@k": min(k, V) / V}}``.
    """
    ks = _check_ks(ks)
    video, audio = _unit_rows(video, "video"), _unit_rows(audio, "audio")
    if video.shape != audio.shape:
        raise ValueError(f"video {tuple(video.shape)} and audio {tuple(audio.shape)} embeddings must have the "
                         "same shape")
    if index is not None:
        if tuple(index.shape) != (video.shape[0],):
            raise ValueError(f"index must be ({video.shape[0]},), got {tuple(index.shape)}")
        index = index.to(video.device)
        video = F.normalize(video_level(video, index)[1], dim=1)
        audio = F.normalize(video_level(audio, index)[1], dim=1)
    n = video.shape[0]
    result: Dict[str, object] = {"num_queries": n, "ks": ks}
    medians = {}
    for direction, (queries, candidates) in (("v2a", (video, audio)), ("a2v", (audio, video))):
        ranks = true_pair_ranks(queries, candidates).cpu()
        result[direction] = {f"R@{k}": float((ranks < k).double().mean()) for k in ks}
        medians[direction] = float((ranks + 1).double().quantile(0.5))
    result["median_rank"] = medians
    result["chance"] = {f"R@{k}": min(k, n) / n for k in ks}
    return result


def cross_modal_class_precision(video: torch.Tensor, audio: torch.Tensor, labels: torch.Tensor) -> Dict[str, object]:
    """Video-to-audio and audio-to-video class-level precision@1 (module docstring).

    Args:
        video, audio: (N, D) embeddings of N videos (any scale: rows are normalised), row r of
            both from video r; N >= 2.
        labels: (N,) int64 class of every video.

    Returns:
        ``{"num_queries": N, "v2a": fraction, "a2v": fraction, "chance": fraction}``.
    """
    video, audio = _unit_rows(video, "video"), _unit_rows(audio, "audio")
    if video.shape != audio.shape:
        raise ValueError(f"video {tuple(video.shape)} and audio {tuple(audio.shape)} embeddings must have the "
                         "same shape")
    n = video.shape[0]
    if n < 2:
        raise ValueError(f"class-level precision needs at least 2 videos, got {n}")
    labels = torch.as_tensor(labels).to(video.device, torch.int64)
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    same = labels[:, None] == labels[None, :]
    others = ~torch.eye(n, dtype=torch.bool, device=video.device)
    result: Dict[str, object] = {"num_queries": n}
    for direction, (queries, candidates) in (("v2a", (video, audio)), ("a2v", (audio, video))):
        sims = queries @ candidates.T
        best_same = sims.masked_fill(~(same & others), float("-inf")).max(dim=1).values
        best_other = sims.masked_fill(same, float("-inf")).max(dim=1).values
        result[direction] = float((best_same > best_other).double().mean())
    result["chance"] = float(((same.sum(dim=1) - 1).double() / (n - 1)).mean())
    return result


def knn_predict(train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: Optional[int] = None, chunk: int = 256) -> torch.Tensor:
    """Weighted cosine k-NN predictions (module docstring): (M, D) training rows with (M,) int64
    labels, (Q, D) test rows -> (Q,) int64 predicted classes. ``k`` is capped at M."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    train = _unit_rows(train_emb, "train_emb")
    test = _unit_rows(test_emb, "test_emb").to(train.device, train.dtype)
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_emb has {train.shape[1]} dimensions, test_emb {test.shape[1]}")
    train_labels = torch.as_tensor(train_labels).to(train.device, torch.int64)
    if tuple(train_labels.shape) != (train.shape[0],):
        raise ValueError(f"train_labels must be ({train.shape[0]},), got {tuple(train_labels.shape)}")
    if bool((train_labels < 0).any()):
        raise ValueError("train_labels must be 0 or more")
    classes = int(train_labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(train_labels.max()) >= classes:
        raise ValueError(f"train_labels go up to {int(train_labels.max())}, beyond num_classes={classes}")
    k = min(k, train.shape[0])
    predictions = []
    for start in range(0, test.shape[0], chunk):
        sims = test[start:start + chunk] @ train.T
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        weights = torch.exp(sims.gather(1, order).double() / temperature)
        votes = torch.zeros(sims.shape[0], classes, dtype=torch.float64, device=sims.device)
        votes.scatter_add_(1, train_labels[order], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions).cpu()


def knn_classify(train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None) -> float:
    """Top-1 (fraction of test rows) of :func:`knn_predict` against ``test_labels`` (Q,) int64."""
    test_labels = torch.as_tensor(test_labels).to(torch.int64).cpu()
    if tuple(test_labels.shape) != (test_emb.shape[0],):
        raise ValueError(f"test_labels must be ({test_emb.shape[0]},), got {tuple(test_labels.shape)}")
    predicted = knn_predict(train_emb, train_labels, test_emb, k, temperature, num_classes)
    return float((predicted == test_labels).double().mean())


@dataclass
class RetrievalResult:
    """Cross-modal recall (:func:`cross_modal_recall`'s dict; None for video-only embeddings) on
    the held-out videos and, when labelled training videos were given, k-NN top-1 (fraction) per
    kind of embedding."""

    recall: Optional[Dict[str, object]]
    num_test_clips: int
    knn: Optional[Dict[str, float]] = None
    num_classes: Optional[int] = None
    num_train_videos: Optional[int] = None
    seconds: float = 0.0
    settings: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        """Plain Python values (for results.json)."""
        return {"recall": self.recall, "num_test_videos": self.settings.get("num_test_videos"),
                "num_test_clips": self.num_test_clips, "knn": self.knn, "num_classes": self.num_classes,
                "knn_chance": None if self.num_classes is None else 1.0 / self.num_classes,
                "num_train_videos": self.num_train_videos, "seconds": self.seconds, "settings": self.settings}

    def format(self) -> str:
        """Recall@k per direction (and chance) in percent, median rank, then k-NN top-1."""
        r = self.recall
        num_test = self.settings.get("num_test_videos")
        lines = []
        if r is None:
            lines.append(f"video only: {num_test} held-out videos ({self.num_test_clips} clips), no sound read")
        else:
            heads = [f"R@{k}" for k in r["ks"]]
            lines.append(f"cross-modal retrieval: {r['num_queries']} held-out videos ({self.num_test_clips} clips), "
                         "cosine similarity, ties ranked against the query; %")
            lines.append(f"{'':<16}" + "".join(f"{h:>9}" for h in heads) + f"{'median rank':>13}")
            for direction, title in DIRECTIONS.items():
                cells = "".join(f"{100 * r[direction][h]:>9.2f}" for h in heads)
                lines.append(f"{title:<16}{cells}{r['median_rank'][direction]:>13.1f}")
            lines.append(f"{'chance':<16}" + "".join(f"{100 * r['chance'][h]:>9.2f}" for h in heads))
        if self.knn is not None:
            s = self.settings
            lines.append(f"k-NN (k={s.get('knn_k')}, weights exp(s/{s.get('temperature')})): "
                         f"{self.num_train_videos} training / {num_test} test videos, {self.num_classes} "
                         f"classes (chance {100 / self.num_classes:.2f}%), top-1 %")
            lines.append("".join(f"{kind:>10}" for kind in self.knn))
            lines.append("".join(f"{100 * v:>10.2f}" for v in self.knn.values()))
        return "\n".join(lines)


def evaluate_retrieval(test: ClipEmbeddings, train: Optional[ClipEmbeddings] = None, ks: Sequence[int] = (1, 5, 10),
                       knn_k: int = 20, temperature: float = 0.07, num_classes: Optional[int] = None,
                       device: Union[str, torch.device] = "cpu") -> RetrievalResult:
    """Recall@k on the videos of ``test`` and, when ``train`` is given (both labelled, class
    indices from the same list), weighted k-NN top-1 of ``test``'s videos from ``train``'s, for
    video, audio and combined embeddings. Everything is scored per video (clips averaged) on
    ``device``. Video-only embeddings (``audio`` None): no recall, the video k-NN only (``train``
    required)."""
    started = time.perf_counter()
    device = torch.device(device)
    videos = test.per_video()
    video_only = videos.audio is None
    if video_only and train is None:
        raise ValueError("video-only embeddings have no cross-modal recall: give labelled training clips for "
                         "the video k-NN")
    recall = None if video_only else cross_modal_recall(videos.video.to(device), videos.audio.to(device), ks)
    knn = num_train = None
    if train is not None:
        if train.label is None or test.label is None:
            raise ValueError("k-NN needs labels on both the training and the test clips")
        reference = train.per_video()
        num_classes = num_classes or 1 + int(max(int(reference.label.max()), int(videos.label.max())))
        kinds = {"video": (reference.video, videos.video)}
        if not video_only:
            kinds.update({"audio": (reference.audio, videos.audio),
                          "combined": (torch.cat([reference.video, reference.audio], 1),
                                       torch.cat([videos.video, videos.audio], 1))})
        knn = {kind: knn_classify(a.to(device), reference.label, b.to(device), videos.label, knn_k, temperature,
                                  num_classes)
               for kind, (a, b) in kinds.items()}
        num_train = len(reference)
    return RetrievalResult(recall=recall, num_test_clips=len(test), knn=knn,
                           num_classes=num_classes if knn is not None else None, num_train_videos=num_train,
                           seconds=time.perf_counter() - started,
                           settings={"ks": list(ks) if recall is None else list(recall["ks"]), "knn_k": knn_k,
                                     "temperature": temperature, "num_test_videos": len(videos),
                                     "video_only": video_only})
