"""The demo's pictures (matplotlib, Agg backend), each written atomically as a PNG:

- ``loss_curve``: the training loss per logged step;
- ``retrieval_grid``: for one held-out video per class, a frame of its first clip and the
  spectrograms of the three sounds each network ranks first for it, trained network beside the
  same network at initialisation; a green frame marks the clip's own sound, blue another clip of
  its class, red another class;
- ``similarity_matrix``: the cosine similarity of every held-out video's picture (rows) with every
  held-out sound (columns), videos sorted by class, both networks.
"""
import os
from typing import Dict, List, Mapping, Tuple

import torch

from avidfast.data.video import IMAGENET_MEAN, IMAGENET_STD

OWN, SAME_CLASS, OTHER_CLASS = "tab:green", "tab:blue", "tab:red"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, png: str) -> None:
    tmp = png + ".tmp.png"
    figure.savefig(tmp)
    _pyplot().close(figure)
    os.replace(tmp, png)


def loss_curve(metrics_csv: str, png: str) -> None:
    """The loss column of the training run's ``metrics.csv`` (step, epoch, loss, ...) against the step."""
    plt = _pyplot()
    steps, losses = [], []
    with open(metrics_csv) as f:
        next(f)
        for line in f:
            fields = line.strip().split(",")
            steps.append(int(fields[0]))
            losses.append(float(fields[2]))
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(steps, losses, lw=1)
    axis.set_xlabel("step")
    axis.set_ylabel("Cross-AVID loss")
    axis.set_title("avidfast demo: training loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, png)


def _first_clips(batches: List[Mapping[str, torch.Tensor]]) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """Per video index: the middle frame of its first clip, (H, W, 3) in [0, 1], and that clip's
    spectrogram (F, T)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    frames, spectrograms = {}, {}
    for batch in batches:
        for row, index in enumerate(batch["index"].reshape(-1).tolist()):
            if index in frames:
                continue
            video = batch["video"][row]  # (3, T, H, W), normalised
            frame = video[:, video.shape[1] // 2] * std + mean
            frames[index] = frame.permute(1, 2, 0).clamp(0, 1)
            spectrograms[index] = batch["audio"][row, 0]
    return frames, spectrograms


def retrieval_grid(batches: List[Mapping[str, torch.Tensor]], embeddings: Mapping[str, object], png: str,
                   top: int = 3) -> None:
    """The retrieval grid (module docstring). ``embeddings``: network name -> per-video
    ClipEmbeddings of the held-out videos (the same videos, in increasing index order, labelled)."""
    plt = _pyplot()
    names = list(embeddings)
    first = embeddings[names[0]]
    frames, spectrograms = _first_clips(batches)
    videos = first.index.tolist()
    labels = first.label.tolist()
    queries = [labels.index(c) for c in sorted(set(labels))]  # the first video of each class
    columns = 1 + top * len(names)
    figure, axes = plt.subplots(len(queries), columns, figsize=(1.7 * columns, 1.8 * len(queries)), dpi=110,
                                squeeze=False)
    for r, q in enumerate(queries):
        axes[r, 0].imshow(frames[videos[q]].numpy())
        axes[r, 0].set_ylabel(f"class {labels[q]}", fontsize=8)
        if r == 0:
            axes[r, 0].set_title("held-out video", fontsize=8)
        for n, name in enumerate(names):
            e = embeddings[name]
            ranked = torch.argsort(e.audio @ e.video[q], descending=True, stable=True)[:top].tolist()
            for rank, candidate in enumerate(ranked):
                axis = axes[r, 1 + n * top + rank]
                axis.imshow(spectrograms[videos[candidate]].numpy(), origin="lower", aspect="auto", cmap="magma")
                colour = OWN if candidate == q else SAME_CLASS if labels[candidate] == labels[q] else OTHER_CLASS
                for spine in axis.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
                axis.set_xlabel(f"class {labels[candidate]}", fontsize=7, color=colour)
                if r == 0:
                    axis.set_title(f"{name} #{rank + 1}", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("the sounds each network ranks first for a held-out video (green: its own sound, blue: same "
                    "class, red: other class)", fontsize=9)
    figure.tight_layout()
    _save(figure, png)


def similarity_matrix(embeddings: Mapping[str, object], png: str) -> None:
    """The similarity matrices (module docstring); ``embeddings`` as for :func:`retrieval_grid`."""
    plt = _pyplot()
    names = list(embeddings)
    figure, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.8), dpi=110, squeeze=False)
    for axis, name in zip(axes[0], names):
        e = embeddings[name]
        order = torch.argsort(e.label, stable=True)
        sims = e.video[order] @ e.audio[order].T
        image = axis.imshow(sims.numpy(), cmap="viridis", interpolation="nearest")
        sorted_labels = e.label[order]
        bounds = (torch.nonzero(sorted_labels[1:] != sorted_labels[:-1]).flatten() + 0.5).tolist()
        for b in bounds:
            axis.axhline(b, color="white", lw=0.6)
            axis.axvline(b, color="white", lw=0.6)
        axis.set_title(f"{name} network", fontsize=10)
        axis.set_xlabel("held-out sounds (sorted by class)")
        axis.set_ylabel("held-out videos (sorted by class)")
        figure.colorbar(image, ax=axis, fraction=0.046, label="cosine similarity")
    figure.suptitle("picture-sound similarity of the held-out clips; the diagonal pairs a clip with its own sound",
                    fontsize=9)
    figure.tight_layout()
    _save(figure, png)
