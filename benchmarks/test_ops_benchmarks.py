"""pytest-benchmark suite of the memory-bank operators: ours and the reference formulation."""
import pytest

from avidfast.bench.ops_suite import CASES
from conftest import ops_case, record


@pytest.mark.parametrize("variant", ["ours", "baseline"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_ops(benchmark, case_name, variant):
    benchmark.group = case_name
    benchmark.name = f"{case_name}[{variant}]"
    case = ops_case(case_name)
    benchmark.pedantic(getattr(case, variant), rounds=10 * case.rounds_scale, warmup_rounds=2)
    record(case_name, variant, benchmark)
