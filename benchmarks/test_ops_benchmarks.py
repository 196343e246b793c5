"""pytest-benchmark suite of the memory-bank operators: ours and the reference formulation."""
import pytest

from avidfast.bench.ops_suite import CASES
from conftest import run_variant


@pytest.mark.parametrize("variant", ["ours", "baseline"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_ops(benchmark, case_name, variant):
    run_variant(benchmark, "ops", case_name, variant, rounds=10)
