"""The demo's steps (`avidfast demo`, `make demo`).

1. writes two synthetic sets (real H.264 + AAC clips whose picture and sound share a hidden class
   and three hidden per-clip values): one to train on, and a held-out one (seed + 1) that the
   network never sees; 2. computes the spectrogram statistics; 3. trains Cross-AVID with the
   `demo` config; 4. measures, on the held-out clips, for the trained network and for the same
   network at initialisation: instance-level cross-modal recall@1/5/10 (a clip's own sound among
   every held-out sound, and the other way round), class-level cross-modal precision@1 and a
   linear probe on the video features (trained on the training set's clips), each with its 95%
   Wilson interval; the memory-bank probe on the training set; 5. draws the pictures and writes
   results.json.

Rerunning reuses finished steps (the data sets, the stats, a finished training run; an
interrupted run resumes).
"""
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from avidfast.files import atomic_write_text

log = logging.getLogger("avidfast")

# Three quarters of the demo's clips show their class's hue (`avidfast synthetic`: a quarter): with a
# quarter or a half, the class showed too faintly for the cross-modal class-level goals (measured in
# avidfast/configs/demo.yaml). Colour also lets a random network's probe read the class, which the
# demo's table shows beside the trained network's.
DEMO_COLOUR_CUE = 0.75


@dataclass
class DemoSettings:
    """Size of the demo (defaults: about 6 minutes on 2 idle cores, including the measurements)."""

    out_dir: str = os.path.join("runs", "demo")
    videos: int = 240
    classes: int = 6
    seconds: float = 4.0
    colour_cue: float = DEMO_COLOUR_CUE  # share of clips painted in their class's hue (random hue otherwise)
    seed: int = 0
    epochs: Optional[int] = None  # None: the demo config's
    probe_clips: int = 2  # evenly spaced clips per video for the measurements
    held_out_videos: int = 180  # videos of a second synthetic set (seed + 1) for every held-out figure
    progress: bool = True
    overrides: Sequence[str] = ()  # extra ``key=value`` settings of the demo training config


def _batches(cfg, manifest, settings: "DemoSettings", stats) -> List[Mapping[str, torch.Tensor]]:
    """``settings.probe_clips`` evenly spaced, centre-cropped clips of every video of ``manifest``,
    decoded once and kept as a list of batches (each measurement reads them again)."""
    from avidfast.data.audio import get_preset
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader
    from avidfast.data.video import VideoConfig

    v = cfg.data.video
    video = VideoConfig(frames=v.frames, fps=v.fps, crop=v.crop)
    dataset = ClipDataset(manifest, video=video, audio_preset=get_preset(cfg.data.audio.preset), stats=stats,
                          mode="eval", clips_per_video=settings.probe_clips, seed=settings.seed)
    return list(CPULoader(dataset, batch_size=32, workers=cfg.data.workers))


def _settings_of(config: Dict[str, object]) -> Dict[str, object]:
    """A training config without the keys that do not change the result (progress bars)."""
    plain = json.loads(json.dumps(config))
    plain.get("train", {}).pop("progress", None)
    return plain


def _with_intervals(figures: Dict[str, object], n: int) -> Dict[str, object]:
    """``figures`` (a recall or precision dict) with an ``interval`` entry: the 95% Wilson interval
    of each of its fractions over ``n`` queries."""
    from avidfast.eval.confidence import fraction_interval

    out = dict(figures)
    out["interval"] = {}
    for key in ("v2a", "a2v"):
        value = figures[key]
        out["interval"][key] = ({name: list(fraction_interval(v, n)) for name, v in value.items()}
                                if isinstance(value, dict) else list(fraction_interval(value, n)))
    return out


def _cross_modal(model, held_out: List[Mapping[str, torch.Tensor]], progress: bool):
    """Per-video embeddings of the held-out clips (a ClipEmbeddings, clips averaged), instance
    recall@1/5/10 and class-level precision@1, each with intervals."""
    from avidfast.eval.retrieval import cross_modal_class_precision, cross_modal_recall, embed_clips

    videos = embed_clips(model, held_out, progress=progress).per_video()
    n = len(videos)
    instance = _with_intervals(cross_modal_recall(videos.video, videos.audio, (1, 5, 10)), n)
    precision = _with_intervals(cross_modal_class_precision(videos.video, videos.audio, videos.label), n)
    return videos, instance, precision


def _linear_probe(model, train_clips, held_out, seed: int, progress: bool) -> Dict[str, object]:
    """A linear probe per block on the frozen video features of the training set's clips, scored on
    the held-out videos; the best block's video-level top-1 as ``held_out_top1`` with its interval."""
    from avidfast.eval.confidence import fraction_interval
    from avidfast.eval.features import extract_features
    from avidfast.eval.linear_probe import train_linear_probe

    train = extract_features(model, train_clips, modality="video", progress=progress)
    test = extract_features(model, held_out, modality="video", progress=progress)
    probe = train_linear_probe(train, test, seed=seed, epochs=60, lr=3e-3, weight_decay=1e-4)
    figures = probe.to_dict()
    figures["held_out_top1"] = probe.best_top1
    figures["interval"] = list(fraction_interval(probe.best_top1, probe.num_test_videos))
    return figures, probe.format()


def run_demo(settings: DemoSettings) -> Dict[str, object]:
    """Runs the demo; returns (and writes to OUT/results.json) its figures."""
    from avidfast.checkpoints import store as ckpt
    from avidfast.checkpoints.build import build_criterion, build_model
    from avidfast.config import ConfigError, load_config
    from avidfast.data.audio import SpectrogramStats, get_preset
    from avidfast.data.manifest import read_manifest
    from avidfast.data.stats import compute_stats
    from avidfast.data.synthetic import make_dataset
    from avidfast.demo import pictures
    from avidfast.demo.report import goals, summary
    from avidfast.eval.memory_probe import memory_probe
    from avidfast.train.loop import train
    from avidfast.train.run_folder import setup_logging

    started = time.perf_counter()
    seconds: Dict[str, float] = {}
    out = settings.out_dir
    os.makedirs(out, exist_ok=True)
    setup_logging(out, rank=0)
    log.info("1/5 synthetic sets: %d clips to train on and %d held-out clips, %d classes, %.0f s each",
             settings.videos, settings.held_out_videos, settings.classes, settings.seconds)
    manifest_path = make_dataset(os.path.join(out, "data"), settings.videos, settings.classes, settings.seconds,
                                 settings.seed, colour_cue=settings.colour_cue, progress=settings.progress)
    held_out_manifest = read_manifest(make_dataset(
        os.path.join(out, "held_out"), settings.held_out_videos, settings.classes, settings.seconds, settings.seed + 1,
        colour_cue=settings.colour_cue, progress=settings.progress))
    manifest = read_manifest(manifest_path)
    overrides = [f"data.manifest={manifest_path}", f"out_dir={os.path.join(out, 'train')}", f"seed={settings.seed}",
                 f"train.progress={str(settings.progress).lower()}"]
    if settings.epochs is not None:
        overrides.append(f"optim.epochs={settings.epochs}")
    overrides.extend(settings.overrides)
    cfg = load_config("demo", overrides)
    if cfg.loss.num_negatives > len(manifest) - 2:  # a toy-sized set has fewer other videos than K
        overrides.append(f"loss.num_negatives={len(manifest) - 2}")
        cfg = load_config("demo", overrides)
    if cfg.optim.samples_per_epoch is None and cfg.optim.batch_size > len(manifest):  # ... or than one batch
        overrides.append(f"optim.batch_size={len(manifest)}")
        cfg = load_config("demo", overrides)
    preset = get_preset(cfg.data.audio.preset)
    stats_path = os.path.join(out, "data", f"{preset.name}-stats.npz")
    if not os.path.isfile(stats_path):
        log.info("2/5 spectrogram statistics (%s)", preset.name)
        stats, _ = compute_stats(manifest, preset, workers=cfg.data.workers, progress=settings.progress)
        stats.save(stats_path)
    else:
        log.info("2/5 spectrogram statistics: reusing %s", stats_path)
    stats = SpectrogramStats.load(stats_path, preset)
    cfg = load_config("demo", overrides + [f"data.audio.stats={stats_path}"])
    seconds["data"] = time.perf_counter() - started

    last = ckpt.latest_checkpoint(cfg.run_dir)
    state = ckpt.load_checkpoint(last) if last else None
    if state is not None and _settings_of(state["config"]) != _settings_of(cfg.to_dict()):
        raise ConfigError(f"{cfg.run_dir} holds a demo run trained with other settings; choose another --out "
                          "(or delete that folder) to train with these")
    if state is not None and state["epoch"] >= cfg.optim.epochs and state["batches_done"] == 0:
        log.info("3/5 training: reusing the finished run in %s", cfg.run_dir)
        model = build_model(cfg)
        model.load_state_dict(state["model"])
        criterion = build_criterion(cfg, len(manifest))
        criterion.load_state_dict(state["criterion"])
        clips_per_second = float("nan")
    else:
        log.info("3/5 training Cross-AVID for %d epochs (%s)", cfg.optim.epochs,
                 "resuming" if state is not None else "from scratch")
        result = train(cfg, resume=state is not None)
        if result.interrupted:
            raise KeyboardInterrupt
        model, criterion, clips_per_second = result.model, result.criterion, result.clips_per_second
    setup_logging(out, rank=0)  # train() pointed the file log at the run folder
    seconds["training"] = time.perf_counter() - started - seconds["data"]

    log.info("4/5 measurements on %d held-out clips, trained network and the same network at initialisation",
             len(held_out_manifest))
    random_model = build_model(cfg)  # the same network at initialisation (before training)
    random_criterion = build_criterion(cfg, len(manifest))
    held_out = _batches(cfg, held_out_manifest, settings, stats)
    train_clips = _batches(cfg, manifest, settings, stats)
    figures: Dict[str, object] = {"chance": 1.0 / settings.classes, "num_classes": settings.classes,
                                  "train_videos": len(manifest), "held_out_videos": len(held_out_manifest),
                                  "clips_per_second": clips_per_second}
    embeddings = {}
    for name, net in (("trained", model), ("random", random_model)):
        net.eval()
        embeddings[name], figures[f"instance_{name}"], figures[f"class_{name}"] = _cross_modal(
            net, held_out, settings.progress)
        figures[f"linear_{name}"], table = _linear_probe(net, train_clips, held_out, settings.seed, settings.progress)
        log.info("%s network: recall@5 video->audio %.1f%%, audio->video %.1f%%; class precision@1 %.1f%% / "
                 "%.1f%%; linear probe on held-out videos:\n%s", name, 100 * figures[f"instance_{name}"]["v2a"]["R@5"],
                 100 * figures[f"instance_{name}"]["a2v"]["R@5"], 100 * figures[f"class_{name}"]["v2a"],
                 100 * figures[f"class_{name}"]["a2v"], table)
    labels = torch.tensor(manifest.label_indices())
    for name, crit in (("trained", criterion), ("random", random_criterion)):
        banks = memory_probe(crit.video_memory.memory.float(), crit.audio_memory.memory.float(), labels,
                             seed=settings.seed, epochs=60, lr=3e-3, weight_decay=1e-4)
        log.info("%s banks:\n%s", name, banks.format())
        figures[f"memory_{name}"] = banks.to_dict()
    figures["goals"] = goals(figures)
    figures["verdict"] = all(g["passed"] for g in figures["goals"])
    seconds["measurements"] = time.perf_counter() - started - seconds["data"] - seconds["training"]

    log.info("5/5 pictures and results")
    pictures.loss_curve(os.path.join(cfg.run_dir, "metrics.csv"), os.path.join(out, "loss_curve.png"))
    pictures.retrieval_grid(held_out, embeddings, os.path.join(out, "retrieval_grid.png"))
    pictures.similarity_matrix(embeddings, os.path.join(out, "similarity_matrix.png"))
    seconds["total"] = time.perf_counter() - started
    figures["seconds"] = seconds
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(figures, indent=2, default=str) + "\n")
    print(summary(figures, out))
    return figures
