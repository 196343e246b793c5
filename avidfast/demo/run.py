"""`avidfast demo` (and `make demo`): the whole method on a laptop CPU, with nothing downloaded.

An application on the top floor of the package: it uses the data, training and evaluation layers
(the synthetic set, `train`, the linear and memory probes, retrieval) and nothing below it uses it.

1. writes the synthetic set (real H.264 + AAC clips whose picture and sound share a hidden class);
2. computes the spectrogram statistics; 3. trains Cross-AVID with the `demo` config;
4. probes what was learned: a linear classifier per block on frozen video features, and on the
   memory banks (5 random 70/30 splits), each against the same probe on the network and banks
   before training, and against chance; 5. writes loss_curve.png and results.json.

Rerunning reuses finished steps (the data set, the stats, a finished training run; an
interrupted run resumes).
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from avidfast.data.synthetic import COLOUR_CUE
from avidfast.files import atomic_write_text

log = logging.getLogger("avidfast")


@dataclass
class DemoSettings:
    """Size of the demo (defaults: about 10 minutes on 2 cores, including the probes)."""

    out_dir: str = os.path.join("runs", "demo")
    videos: int = 240
    classes: int = 6
    seconds: float = 4.0
    colour_cue: float = COLOUR_CUE  # share of clips painted in their class's hue (random hue otherwise)
    seed: int = 0
    epochs: Optional[int] = None  # None: the demo config's
    probe_clips: int = 2  # evenly spaced clips per video for the linear probe and retrieval
    held_out_videos: int = 60  # clips of a second synthetic set (seed + 1) for cross-modal retrieval
    progress: bool = True
    overrides: Sequence[str] = ()  # extra ``key=value`` settings of the demo training config


def _eval_loader(cfg, manifest, settings: "DemoSettings", stats):
    """``settings.probe_clips`` evenly spaced, centre-cropped clips of every video of ``manifest``."""
    from avidfast.data.audio import get_preset
    from avidfast.data.cpu_pipeline import ClipDataset, CPULoader
    from avidfast.data.video import VideoConfig

    v = cfg.data.video
    video = VideoConfig(frames=v.frames, fps=v.fps, crop=v.crop)
    dataset = ClipDataset(manifest, video=video, audio_preset=get_preset(cfg.data.audio.preset), stats=stats,
                          mode="eval", clips_per_video=settings.probe_clips, seed=settings.seed)
    return CPULoader(dataset, batch_size=32, workers=cfg.data.workers)


def _probe_features(model, cfg, manifest, settings: "DemoSettings", stats):
    from avidfast.eval.features import extract_features

    return extract_features(model, _eval_loader(cfg, manifest, settings, stats), modality="video",
                            progress=settings.progress)


def _settings_of(config: Dict[str, object]) -> Dict[str, object]:
    """A training config without the keys that do not change the result (progress bars)."""
    plain = json.loads(json.dumps(config))
    plain.get("train", {}).pop("progress", None)
    return plain


def _held_out_recall(model, cfg, manifest, settings: "DemoSettings", stats) -> Dict[str, object]:
    """Video-to-audio / audio-to-video recall@1,5,10 of ``model``'s embeddings over the videos of
    ``manifest`` (its evaluation clips averaged per video)."""
    from avidfast.eval.retrieval import cross_modal_recall, embed_clips

    clips = embed_clips(model, _eval_loader(cfg, manifest, settings, stats), progress=settings.progress)
    return cross_modal_recall(clips.video, clips.audio, (1, 5, 10), index=clips.index)


def _loss_curve(metrics_csv: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    tmp = png + ".tmp.png"
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, png)


def run_demo(settings: DemoSettings) -> Dict[str, object]:
    """Runs the demo; returns (and writes to OUT/results.json) its figures."""
    from avidfast.data.audio import SpectrogramStats, get_preset
    from avidfast.data.manifest import read_manifest
    from avidfast.data.stats import compute_stats
    from avidfast.data.synthetic import make_dataset
    from avidfast.eval.data import stratified_split
    from avidfast.eval.linear_probe import train_linear_probe
    from avidfast.eval.memory_probe import memory_probe
    from avidfast.checkpoints import store as ckpt
    from avidfast.checkpoints.build import build_criterion, build_model
    from avidfast.config import ConfigError, load_config
    from avidfast.train.loop import train
    from avidfast.train.run_folder import setup_logging

    out = settings.out_dir
    os.makedirs(out, exist_ok=True)
    setup_logging(out, rank=0)
    log.info("1/5 synthetic set: %d clips of %d classes, %.0f s each", settings.videos, settings.classes, settings.seconds)
    manifest_path = make_dataset(os.path.join(out, "data"), settings.videos, settings.classes, settings.seconds,
                                 settings.seed, colour_cue=settings.colour_cue, progress=settings.progress)
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

    log.info("4/5 probes: linear probe per block on frozen video features, memory-bank probe")
    random_model = build_model(cfg)  # the same network at initialisation (before training)
    random_criterion = build_criterion(cfg, len(manifest))
    labels = torch.tensor(manifest.label_indices())  # class indices: positions in manifest.classes
    train_videos, _ = stratified_split(labels, 0.3, settings.seed)  # 70% of each class's videos train the probe
    figures: Dict[str, object] = {"chance": 1.0 / settings.classes, "clips_per_second": clips_per_second}
    for name, net in (("trained", model), ("random", random_model)):
        features = _probe_features(net.eval(), cfg, manifest, settings, stats)
        in_train = torch.isin(features.index, train_videos)
        probe = train_linear_probe(features.select(in_train), features.select(~in_train), seed=settings.seed,
                                   epochs=60, lr=3e-3, weight_decay=1e-4)
        log.info("%s network:\n%s", name, probe.format())
        figures[f"linear_{name}"] = probe.to_dict()
    for name, crit in (("trained", criterion), ("random", random_criterion)):
        banks = memory_probe(crit.video_memory.memory.float(), crit.audio_memory.memory.float(), labels,
                             seed=settings.seed, epochs=60, lr=3e-3, weight_decay=1e-4)
        log.info("%s banks:\n%s", name, banks.format())
        figures[f"memory_{name}"] = banks.to_dict()

    log.info("cross-modal retrieval on held-out synthetic clips (a set the network never saw)")
    held_out = read_manifest(make_dataset(os.path.join(out, "held_out"), settings.held_out_videos, settings.classes,
                                          settings.seconds, settings.seed + 1, colour_cue=settings.colour_cue,
                                          progress=settings.progress))
    for name, net in (("trained", model), ("random", random_model)):
        recall = _held_out_recall(net, cfg, held_out, settings, stats)
        log.info("%s network: recall@1 video->audio %.2f%%, audio->video %.2f%% (chance %.2f%%)", name,
                 100 * recall["v2a"]["R@1"], 100 * recall["a2v"]["R@1"], 100 * recall["chance"]["R@1"])
        figures[f"retrieval_{name}"] = recall

    log.info("5/5 loss curve and results")
    _loss_curve(os.path.join(cfg.run_dir, "metrics.csv"), os.path.join(out, "loss_curve.png"))
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(figures, indent=2, default=str) + "\n")
    print(summary(figures, out))
    return figures


def summary(figures: Dict[str, object], out: str) -> str:
    """The demo's closing table."""
    chance = figures["chance"]
    trained, random_ = figures["linear_trained"], figures["linear_random"]
    best_t, best_r = trained["best_block"], random_["best_block"]
    t, r = trained["video_top1"][best_t], random_["video_top1"][best_r]
    mt, mr = figures["memory_trained"], figures["memory_random"]
    lines = [
        "",
        "avidfast demo: what Cross-AVID learned on the synthetic set (held-out videos, top-1)",
        f"  chance                                   {100 * chance:6.2f}%",
        f"  linear probe, trained network ({best_t:>6})   {100 * t:6.2f}%  ({t / chance:.1f}x chance)",
        f"  linear probe, random network  ({best_r:>6})   {100 * r:6.2f}%  ({r / chance:.1f}x chance)",
    ]
    for kind in mt["mean"]:
        lines.append(f"  memory probe, {kind:<8} trained banks      {100 * mt['mean'][kind]:6.2f}% +- "
                     f"{100 * mt['std'][kind]:.2f}  (random banks {100 * mr['mean'][kind]:.2f}%)")
    rt, rr = figures["retrieval_trained"], figures["retrieval_random"]
    lines.append(f"  retrieval recall@1 on {rt['num_queries']} held-out videos: trained video->audio "
                 f"{100 * rt['v2a']['R@1']:.2f}%, audio->video {100 * rt['a2v']['R@1']:.2f}%; random network "
                 f"{100 * rr['v2a']['R@1']:.2f}% / {100 * rr['a2v']['R@1']:.2f}% (chance {100 * rt['chance']['R@1']:.2f}%)")
    verdict = "learned" if t >= 3 * chance and t > r else "did NOT reach 3x chance above the random network"
    lines.append(f"  verdict: {verdict}; loss curve {os.path.join(out, 'loss_curve.png')}, "
                 f"TensorBoard: tensorboard --logdir {os.path.join(out, 'train', 'tb')}")
    return "\n".join(lines)
