"""Shared cases for the pytest-benchmark suites, and a summary table of ours-vs-baseline ratios.

Each case's two variants are separate benchmarks in one group (pytest-benchmark's own table
shows them side by side); at the end, a table gives per case the median of each, the speed-up
and the peak extra memory of each variant, all from this run.
"""
import functools
import os

import pytest
import torch

from avidfast.bench.ops_suite import CASES, OpsBenchConfig
from avidfast.bench.report import describe_machine
from avidfast.bench.timing import peak_extra_memory

DEVICE = os.environ.get("AVIDFAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
_RECORDS = {}


@functools.lru_cache(maxsize=None)
def ops_case(name: str):
    """The benchmark case `name` on DEVICE, built once per session (banks are large)."""
    return CASES[name](OpsBenchConfig(device=DEVICE), torch.device(DEVICE))


def record(case_name: str, variant: str, benchmark) -> None:
    """Measures the variant's peak extra memory and keeps it with pytest-benchmark's stats."""
    fn = getattr(ops_case(case_name), variant)
    benchmark.extra_info["peak_extra_mb"] = peak_extra_memory(fn, torch.device(DEVICE)) / 2**20
    _RECORDS[(case_name, variant)] = benchmark


@pytest.fixture
def bench_device() -> str:
    return DEVICE


def pytest_terminal_summary(terminalreporter):
    if not _RECORDS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"ours vs reference formulation on {describe_machine(DEVICE)}")
    write(f"{'case':18} {'ours ms':>9} {'baseline ms':>12} {'speed-up':>9} {'ours peak MB':>13} {'baseline peak MB':>17}")
    for name in CASES:
        ours, base = _RECORDS.get((name, "ours")), _RECORDS.get((name, "baseline"))
        if ours is None or base is None or ours.stats is None or base.stats is None:
            continue
        ours_ms, base_ms = ours.stats.stats.median * 1e3, base.stats.stats.median * 1e3
        write(f"{name:18} {ours_ms:9.3f} {base_ms:12.3f} {base_ms / ours_ms:8.2f}x "
              f"{ours.extra_info['peak_extra_mb']:13.2f} {base.extra_info['peak_extra_mb']:17.2f}")
