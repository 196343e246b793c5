"""pytest-benchmark suite of CMA positive mining: cma_topk, the 16-query method, bare matmuls.

Each round mines the default slice of 4,096 of the N = 50,000 queries (all variants scale
linearly with the queries); `avidfast bench cma` prints the same comparison interleaved, with
times extrapolated to all N.
"""
import pytest

from avidfast.bench.cma_suite import CASES
from conftest import run_variant


@pytest.mark.parametrize("variant", ["ours", "sixteen_query", "bare_matmul"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_cma_mining(benchmark, case_name, variant):
    run_variant(benchmark, "cma", case_name, variant, rounds=3)
