"""Shards against file-per-clip: clips/s of the CPU pipeline reading the same clips both ways, and
the files each way opens in an epoch.

Each round reads one whole training epoch of the data set with each variant (a fresh loader each,
alternating which goes first; the same clips, the same augmentation work) and times it from the
first batch to the last (worker start-up excluded); the figure is the median over rounds of clips
per second, and the ratio of the medians. File opens are counted over one more epoch read in this
process (no workers), at the two places files are opened: Python's ``open``/``os.open`` (through
an audit hook: ``wave``, the shard files) and PyAV's ``av.open`` given a file name (FFmpeg opens
those itself, so it is counted by wrapping ``av.open``).
"""
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

from avidfast.data.cpu_pipeline import ClipDataset, CPULoader
from avidfast.data.manifest import Manifest, manifest_fingerprint
from avidfast.data.shards.dataset import ShardClipDataset
from avidfast.data.shards.index import ShardIndex
from avidfast.data.video import VideoConfig


@dataclass
class ShardBenchConfig:
    video: VideoConfig = VideoConfig()
    audio_preset: str = "table5"
    batch_size: int = 8
    workers: int = 2
    rounds: int = 3
    seed: int = 0


@dataclass
class ShardBenchResult:
    name: str
    rates: List[float] = field(default_factory=list)  # clips/s per round
    opens: int = 0  # files opened in one epoch
    clips: int = 0  # clips in that epoch

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def _dataset(name: str, manifest: Manifest, index: ShardIndex, cfg: ShardBenchConfig):
    common = dict(video=cfg.video, audio_preset=cfg.audio_preset, seed=cfg.seed)
    return ClipDataset(manifest, **common) if name == "files" else ShardClipDataset(index, **common)


def _epoch_rate(dataset, cfg: ShardBenchConfig, epoch: int) -> float:
    loader = CPULoader(dataset, batch_size=cfg.batch_size, workers=cfg.workers, max_bad_fraction=0.0)
    loader.set_epoch(epoch)
    seen, start = 0, None
    for batch in loader:
        if start is None:
            start = time.perf_counter()
            continue
        seen += batch["index"].numel()
    return seen / (time.perf_counter() - start)


class _OpenCounter:
    """Counts file opens while ``counting`` is set (audit hooks cannot be removed, so it stays
    installed and idle afterwards)."""

    installed = None

    def __init__(self):
        self.counting, self.count = False, 0

    @classmethod
    def get(cls) -> "_OpenCounter":
        if cls.installed is None:
            cls.installed = cls()
            sys.addaudithook(cls.installed._hook)
        return cls.installed

    def _hook(self, event: str, args) -> None:
        if self.counting and event == "open" and isinstance(args[0], (str, bytes)):
            self.count += 1


def _count_opens(dataset, cfg: ShardBenchConfig) -> int:
    import av

    counter = _OpenCounter.get()
    plain_open = av.open

    def counted_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes)) and counter.counting:
            counter.count += 1
        return plain_open(file, *args, **kwargs)

    loader = CPULoader(dataset, batch_size=cfg.batch_size, workers=0, max_bad_fraction=0.0)
    loader.set_epoch(1000)
    av.open = counted_open
    counter.count, counter.counting = 0, True
    try:
        for _ in loader:
            pass
    finally:
        counter.counting = False
        av.open = plain_open
    return counter.count


def run_shard_benchmark(manifest: Manifest, index: ShardIndex, cfg: ShardBenchConfig,
                        progress: Callable[[str], None] = lambda message: None) -> List[ShardBenchResult]:
    """Times file-per-clip and shard reading of ``manifest``'s clips (``index``: the same clips as shards)."""
    if index.fingerprint != manifest_fingerprint(manifest):
        raise ValueError(f"the shards in {index.folder} do not hold the {len(manifest)} rows of the manifest; write "
                         "them from it with `avidfast prepare ... --shards`")
    results: Dict[str, ShardBenchResult] = {name: ShardBenchResult(name) for name in ("files", "shards")}
    for round_ in range(cfg.rounds):
        names = list(results) if round_ % 2 == 0 else list(results)[::-1]
        for name in names:
            rate = _epoch_rate(_dataset(name, manifest, index, cfg), cfg, round_)
            results[name].rates.append(rate)
            progress(f"round {round_ + 1}/{cfg.rounds} {name}: {rate:.2f} clips/s")
    for name, result in results.items():
        result.opens = _count_opens(_dataset(name, manifest, index, cfg), cfg)
        result.clips = (len(manifest) // cfg.batch_size) * cfg.batch_size
        progress(f"{name}: {result.opens} file opens in an epoch of {result.clips} clips")
    return list(results.values())


def format_shard_table(results: List[ShardBenchResult], cfg: ShardBenchConfig, machine: str, data: str) -> str:
    """Median clips/s of each variant, the ratio of shards to files, and the opens per epoch."""
    files = next(r for r in results if r.name == "files")
    lines = [
        f"machine: {machine}",
        f"data: {data}",
        f"clips: {cfg.video.frames}x{cfg.video.crop}^2 video + {cfg.audio_preset} audio, training augmentation; "
        f"batch {cfg.batch_size}, {cfg.workers} workers; one epoch per round, {cfg.rounds} rounds (median)",
        f"{'variant':<8} {'clips/s':>8} {'vs files':>9} {'opens/epoch':>12}  per round",
    ]
    for r in results:
        rounds = ", ".join(f"{rate:.2f}" for rate in r.rates)
        lines.append(f"{r.name:<8} {r.median:>8.2f} {r.median / files.median:>8.2f}x {r.opens:>12d}  {rounds}")
    return "\n".join(lines)
