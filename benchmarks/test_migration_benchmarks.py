"""pytest-benchmark suite of the migrations (docs/migration.md): each peer's step and avidfast's drop-in."""
import pytest

from avidfast.bench.migration_suite import CASES
from conftest import run_variant


@pytest.mark.parametrize("variant", ["ours", "peer"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_migration(benchmark, case_name, variant):
    run_variant(benchmark, "migration", case_name, variant, rounds=5)
