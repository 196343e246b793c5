"""Shared cases for the pytest-benchmark suites, and a summary table of ours-vs-baseline ratios.

Each case's variants are separate benchmarks in one group (pytest-benchmark's own table shows
them side by side, with ratios); at the end, a table gives per case and baseline the median of
each, the speed-up of ours and each variant's peak extra memory, all from this run.
"""
import functools
import os

import pytest
import torch

from avidfast.bench.cma_suite import CASES as CMA_CASES
from avidfast.bench.cma_suite import CMABenchConfig
from avidfast.bench.migration_suite import CASES as MIGRATION_CASES
from avidfast.bench.ops_suite import CASES as OPS_CASES
from avidfast.bench.ops_suite import OpsBenchConfig
from avidfast.bench.report import describe_machine
from avidfast.bench.train_suite import CASES as TRAIN_CASES
from avidfast.bench.train_suite import TrainBenchConfig
from avidfast.bench.timing import peak_extra_memory, peak_resident_growth

DEVICE = os.environ.get("AVIDFAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SUITES = {"ops": (OPS_CASES, OpsBenchConfig), "cma": (CMA_CASES, CMABenchConfig),
          "train": (TRAIN_CASES, TrainBenchConfig), "migration": (MIGRATION_CASES, OpsBenchConfig)}
_RECORDS = {}


@functools.lru_cache(maxsize=None)
def bench_case(suite: str, name: str):
    """The benchmark case `name` of `suite` on DEVICE, built once per session (banks are large)."""
    builders, config = SUITES[suite]
    return builders[name](config(device=DEVICE), torch.device(DEVICE))


def run_variant(benchmark, suite: str, case_name: str, variant: str, rounds: int) -> None:
    """pytest-benchmark timing of one variant, plus its peak extra memory for the summary."""
    case = bench_case(suite, case_name)
    fn = case.variants[variant]
    benchmark.group = case_name
    benchmark.name = f"{case_name}[{variant}]"
    benchmark.pedantic(fn, rounds=rounds * case.rounds_scale, warmup_rounds=1)
    peak = peak_resident_growth(fn) if case.memory == "resident" and DEVICE == "cpu" else peak_extra_memory(fn, torch.device(DEVICE))
    benchmark.extra_info["peak_extra_mb"] = peak / 2**20
    _RECORDS.setdefault(case_name, {})[variant] = benchmark


def pytest_terminal_summary(terminalreporter):
    if not _RECORDS:
        return
    write = terminalreporter.write_line
    write("")
    write(f"ours vs baselines on {describe_machine(DEVICE)} (medians of this run)")
    write(f"{'case':22} {'baseline':14} {'ours ms':>10} {'baseline ms':>12} {'speed-up':>9} {'ours peak MB':>13} {'baseline peak MB':>17}")
    for case_name, variants in _RECORDS.items():
        ours = variants.get("ours")
        if ours is None or ours.stats is None:
            continue
        ours_ms = ours.stats.stats.median * 1e3
        for variant, base in variants.items():
            if variant == "ours" or base.stats is None:
                continue
            base_ms = base.stats.stats.median * 1e3
            write(f"{case_name:22} {variant:14} {ours_ms:10.3f} {base_ms:12.3f} {base_ms / ours_ms:8.2f}x "
                  f"{ours.extra_info['peak_extra_mb']:13.2f} {base.extra_info['peak_extra_mb']:17.2f}")
