"""Data-pipeline throughput: our CPU pipeline against a reference-shaped loader, same worker
count, plus DALI (CPU mode on VP9 copies, or GPU) beside them.

Ours reads ``manifest`` with each frame decoder asked for (PyAV, torchcodec); the baseline reads
``baseline_manifest`` (default: the same files), so that ours on training-resolution copies
(``avidfast prepare --short-side``) can be set against the baseline on the originals.

Each round builds a fresh loader per variant (alternating which goes first), reads ``clips``
clips, and times from the moment every worker has delivered its first batch to the last batch
(worker start-up excluded: a real run's workers start once, not every 64 clips); the reported
figure is the median over rounds of clips per second, and the ratio of medians.
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from avidfast.data.audio import AudioJitter
from avidfast.data.cpu_pipeline import ClipDataset, CPULoader
from avidfast.data.manifest import Manifest
from avidfast.data.video import VideoConfig


@dataclass
class LoaderBenchConfig:
    """What each variant loads: training clips of ``video`` plus ``audio_preset`` spectrograms."""

    video: VideoConfig = VideoConfig()  # 16 x 112^2 at 16 fps, the paper's training jitter
    audio_preset: str = "table5"
    batch_size: int = 8
    workers: int = 2
    clips: int = 64  # timed clips per round (after each worker's first batch)
    rounds: int = 3
    seed: int = 0
    decoders: Tuple[str, ...] = ("pyav",)  # our frame decoders to time, each a variant


@dataclass
class LoaderResult:
    """Clips per second of each variant in each round."""

    name: str
    description: str
    rates: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def _time_loader(make: Callable[[], Iterable], clips: int, warm_batches: int) -> float:
    """Clips per second after the first ``warm_batches`` batches, over ``clips`` clips."""
    loader = make()
    seen, start, warm = 0, None, 0
    for batch in loader:
        if warm < warm_batches:
            warm += 1
            if warm == warm_batches:
                start = time.perf_counter()
            continue
        seen += batch["index"].numel()
        if seen >= clips:
            break
    elapsed = time.perf_counter() - start
    del loader
    return seen / elapsed


def _warm_batches(cfg: "LoaderBenchConfig") -> int:
    """Batches left untimed: one per worker, each worker's first (its start-up, imports and
    decoder libraries loaded, e.g. about 2 s of CPU for torchcodec's first use in a process)."""
    return max(1, cfg.workers)


def _cpu_variant(dataset_cls, manifest: Manifest, cfg: LoaderBenchConfig, epochs: List[int],
                 decoder: str = "pyav") -> Callable[[], Iterable]:
    def make():
        dataset = dataset_cls(manifest, video=cfg.video, audio_preset=cfg.audio_preset, jitter=AudioJitter(),
                              seed=cfg.seed, decoder=decoder)
        needed = cfg.clips + (_warm_batches(cfg) + 1) * cfg.batch_size
        loader = CPULoader(dataset, batch_size=cfg.batch_size, workers=cfg.workers, samples_per_epoch=needed,
                           max_bad_fraction=0.0)
        loader.set_epoch(epochs[0])
        return loader

    return make


def run_loader_benchmark(
    manifest: Manifest,
    cfg: LoaderBenchConfig,
    *,
    dali_manifest: Optional[Manifest] = None,
    dali_device: Optional[int] = None,
    baseline: bool = True,
    baseline_manifest: Optional[Manifest] = None,
    progress: Callable[[str], None] = lambda message: None,
) -> List[LoaderResult]:
    """Times our CPU pipeline (one variant per decoder of ``cfg.decoders``), the reference-shaped
    loader (``baseline``, on ``baseline_manifest`` or else ``manifest``) and, with
    ``dali_manifest``, the DALI pipeline (CPU mode when dali_device is None)."""
    from avidfast.bench.loader_baseline import ReferenceShapedDataset

    epochs = [0]
    variants: Dict[str, LoaderResult] = {}
    makers: Dict[str, Callable[[], Iterable]] = {}
    for decoder in cfg.decoders:
        name = "ours" if decoder == "pyav" else f"ours-{decoder}"
        variants[name] = LoaderResult(name, f"avidfast CPU pipeline, {decoder} decoder, {cfg.workers} workers")
        makers[name] = _cpu_variant(ClipDataset, manifest, cfg, epochs, decoder)
    if baseline:
        variants["reference-shaped"] = LoaderResult(
            "reference-shaped", f"PyAV -> PIL per frame -> PIL transforms -> numpy STFT, {cfg.workers} workers"
            + (", on the baseline files" if baseline_manifest is not None else ""))
        makers["reference-shaped"] = _cpu_variant(ReferenceShapedDataset, baseline_manifest or manifest, cfg, epochs)
    if dali_manifest is not None:
        from avidfast.data.dali_pipeline import build_dali_loader

        where = "CPU mode" if dali_device is None else f"GPU {dali_device}"

        def make_dali():
            needed = cfg.clips + (_warm_batches(cfg) + 1) * cfg.batch_size
            loader = build_dali_loader(
                dali_manifest, video=cfg.video, audio_preset=cfg.audio_preset, stats=None,
                batch_size=cfg.batch_size, seed=cfg.seed, device_id=dali_device,
                num_threads=cfg.workers, samples_per_epoch=needed,
            )
            loader.set_epoch(epochs[0])
            return loader

        variants["dali"] = LoaderResult("dali", f"DALI pipeline ({where}), {cfg.workers} threads")
        makers["dali"] = make_dali
    names = list(makers)
    for round_ in range(cfg.rounds):
        epochs[0] = round_  # fresh clips and augmentation every round, the same for every variant
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            rate = _time_loader(makers[name], cfg.clips, _warm_batches(cfg))
            variants[name].rates.append(rate)
            progress(f"round {round_ + 1}/{cfg.rounds} {name}: {rate:.2f} clips/s")
    return list(variants.values())


def format_loader_table(results: List[LoaderResult], cfg: LoaderBenchConfig, machine: str, files: str) -> str:
    """A table of median clips/s per variant and each one's ratio to the reference-shaped loader."""
    base = next((r for r in results if r.name == "reference-shaped"), None)
    lines = [
        f"machine: {machine}",
        f"files: {files}",
        f"clips: {cfg.video.frames}x{cfg.video.crop}^2 video at {cfg.video.fps:g} fps + {cfg.audio_preset} audio, "
        f"training augmentation; batch {cfg.batch_size}; {cfg.clips} clips x {cfg.rounds} rounds (median)",
        f"{'variant':<18} {'clips/s':>8} {'vs reference-shaped':>20}  description",
    ]
    for r in results:
        ratio = f"{r.median / base.median:.2f}x" if base is not None else "-"
        lines.append(f"{r.name:<18} {r.median:>8.2f} {ratio:>20}  {r.description}; rounds: "
                     + ", ".join(f"{rate:.2f}" for rate in r.rates))
    return "\n".join(lines)
