"""pytest-benchmark suite of the training step: ours (fused loss; fp32, channels_last_3d, bf16)
and the reference-shaped step (fp32, contiguous, gather/bmm loss), Table 5 networks."""
import pytest

from avidfast.bench.train_suite import CASES
from conftest import run_variant


@pytest.mark.parametrize("variant", ["ours", "reference_shaped"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_training_step(benchmark, case_name, variant):
    run_variant(benchmark, "train", case_name, variant, rounds=3)
