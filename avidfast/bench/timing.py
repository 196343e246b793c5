"""Interleaved timing and peak-memory measurement of ours-versus-baseline comparisons.

Machines here are shared and noisy, so a comparison times both variants in the same run,
alternating which goes first in each round, and reports medians and their ratio.
"""
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass
class Measurement:
    """Wall-clock times of one variant (seconds per call) and its peak extra memory (bytes)."""

    times: List[float]
    peak_extra_bytes: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def iqr_ms(self) -> float:
        q1, _, q3 = statistics.quantiles(self.times, n=4)
        return (q3 - q1) * 1e3


@dataclass
class Comparison:
    """One benchmark case: ours and its baseline measured in the same run."""

    name: str
    description: str
    ours: Measurement
    baseline: Measurement

    @property
    def speedup(self) -> float:
        """Baseline median time over ours (> 1: ours is faster)."""
        return self.baseline.median_ms / self.ours.median_ms

    @property
    def memory_ratio(self) -> float:
        """Our peak extra memory over the baseline's (< 1: ours needs less)."""
        return self.ours.peak_extra_bytes / max(self.baseline.peak_extra_bytes, 1)

    def as_dict(self) -> Dict[str, float]:
        return {
            "case": self.name,
            "ours_median_ms": self.ours.median_ms,
            "baseline_median_ms": self.baseline.median_ms,
            "speedup": self.speedup,
            "ours_peak_extra_mb": self.ours.peak_extra_bytes / 2**20,
            "baseline_peak_extra_mb": self.baseline.peak_extra_bytes / 2**20,
            "memory_ratio": self.memory_ratio,
            "rounds": len(self.ours.times),
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: Dict[str, Callable[[], object]], rounds: int, warmup: int,
                     device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each variant over `rounds` rounds, alternating the order each round."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            _synchronize(device)
            start = time.perf_counter()
            variants[name]()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def _stderr_silenced():
    """Silences file descriptor 2 (the profiler's C++ start/stop chatter) inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by one call of fn at its peak, above what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: the profiler's record of every allocation
    and free made through PyTorch's CPU allocator (per-thread scratch outside it is not counted).
    """
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    changes = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    current = peak = 0
    for _, nbytes in changes:
        current += nbytes
        peak = max(peak, current)
    return peak


def compare(name: str, description: str, ours: Callable[[], object], baseline: Callable[[], object],
            rounds: int, warmup: int, device: torch.device) -> Comparison:
    """Times ours and baseline interleaved, then measures each one's peak extra memory."""
    times = time_interleaved({"ours": ours, "baseline": baseline}, rounds, warmup, device)
    return Comparison(
        name,
        description,
        Measurement(times["ours"], peak_extra_memory(ours, device)),
        Measurement(times["baseline"], peak_extra_memory(baseline, device)),
    )
