import os
import random

import pytest
import torch

# One fresh seed per session (printed in the header); set AVIDFAST_TEST_SEED to replay a failure.
SESSION_SEED = int(os.environ.get("AVIDFAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"avidfast test seed: {SESSION_SEED} (replay with AVIDFAST_TEST_SEED={SESSION_SEED})"


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Seeds torch per test from the session seed and the test's name."""
    torch.manual_seed(SESSION_SEED + sum(map(ord, request.node.nodeid)))


def unit_rows(n: int, d: int, dtype=torch.float32) -> torch.Tensor:
    """(n, d) random L2-normalised rows."""
    return torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
