import os
import sys

import pytest
import torch

from avidfast.hugepages import advise_huge_pages, empty_rows

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def test_small_tensors_are_left_alone():
    assert advise_huge_pages(torch.empty(100)) is False


@pytest.mark.skipif(
    sys.platform != "linux" or not os.path.exists(THP) or "[never]" in open(THP).read(),
    reason="transparent huge pages are unavailable here",
)
def test_advised_rows_are_backed_by_huge_pages():
    before = _anon_huge_kib()
    rows = empty_rows(64 * 1024, 256, torch.float32)  # 64 MiB, untouched
    rows.fill_(1.0)
    gained_mib = (_anon_huge_kib() - before) / 1024
    assert gained_mib >= 32, f"only {gained_mib:.0f} MiB of the 64 MiB bank got huge pages"
