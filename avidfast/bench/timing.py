"""Interleaved timing and peak-memory measurement of ours-versus-baseline comparisons.

Machines here are shared and noisy, so a comparison times both variants in the same run,
alternating which goes first in each round, and reports medians and their ratio.
"""
import contextlib
import ctypes
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
    """One benchmark case: ours and its baselines, measured in the same run."""

    name: str
    description: str
    measurements: Dict[str, Measurement]  # "ours" and one entry per baseline

    @property
    def ours(self) -> Measurement:
        return self.measurements["ours"]

    @property
    def baselines(self) -> List[str]:
        return [name for name in self.measurements if name != "ours"]

    def speedup(self, baseline: str) -> float:
        """Baseline median time over ours (> 1: ours is faster)."""
        return self.measurements[baseline].median_ms / self.ours.median_ms

    def memory_ratio(self, baseline: str) -> float:
        """Our peak extra memory over the baseline's (< 1: ours needs less)."""
        return self.ours.peak_extra_bytes / max(self.measurements[baseline].peak_extra_bytes, 1)

    def as_dict(self) -> Dict[str, object]:
        return {
            "case": self.name,
            "description": self.description,
            "rounds": len(self.ours.times),
            "median_ms": {name: m.median_ms for name, m in self.measurements.items()},
            "peak_extra_mb": {name: m.peak_extra_bytes / 2**20 for name, m in self.measurements.items()},
            "speedup": {name: self.speedup(name) for name in self.baselines},
            "memory_ratio": {name: self.memory_ratio(name) for name in self.baselines},
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
    """Bytes allocated through PyTorch by one call of fn at its peak, above the level before it.

    CUDA: the caching allocator's peak statistic. CPU: the profiler's record of every allocation
    and free made through PyTorch's CPU allocator (scratch a kernel allocates itself is not
    counted: use peak_resident_growth for kernels with native buffers).
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


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _release_free_heap() -> None:
    """Returns freed heap memory to the OS (glibc malloc_trim), so that memory the call reuses
    must be faulted in again and shows in the resident peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def peak_resident_growth(fn: Callable[[], object]) -> int:
    """Bytes by which one call of fn raises the process's peak resident memory (Linux): every
    allocation counts, PyTorch's or a kernel's own (freed heap memory is released first, so
    that reusing it counts too). Falls back to peak_extra_memory where /proc/self/clear_refs is
    unavailable."""
    try:
        _release_free_heap()
        resident = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
    except OSError:
        return peak_extra_memory(fn, torch.device("cpu"))
    fn()
    return max(0, _status_bytes("VmHWM") - resident)


def compare(name: str, description: str, variants: Dict[str, Callable[[], object]], rounds: int,
            warmup: int, device: torch.device, memory: str = "allocator") -> Comparison:
    """Times the variants ("ours" and its baselines) interleaved, then measures each one's peak
    extra memory: "allocator" (PyTorch's allocations) or "resident" (process memory, CPU)."""
    times = time_interleaved(variants, rounds, warmup, device)
    measure = peak_resident_growth if memory == "resident" and device.type == "cpu" \
        else (lambda fn: peak_extra_memory(fn, device))
    return Comparison(name, description, {key: Measurement(times[key], measure(fn)) for key, fn in variants.items()})
