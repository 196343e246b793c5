"""The bad-input sweep (scripts/bad_input_sweep.py): ~120 mistakes against the command line and the
Python API, each of which must end in one line (a refusal, or the warning the case expects), never
in a traceback, never accepted silently, and the refused ones must leave nothing behind.

Prints every case that went wrong and the counts; run the script itself against another checkout
to count what it gets wrong (``PYTHONPATH=CHECKOUT python scripts/bad_input_sweep.py``).
"""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bad_input_sweep.py"


@pytest.fixture(scope="module")
def sweep_module():
    if not SCRIPT.is_file():
        pytest.skip("scripts/bad_input_sweep.py is not here (tests run against an installed package)")
    spec = importlib.util.spec_from_file_location("bad_input_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_bad_input_ends_in_a_traceback(sweep_module, tmp_path):
    outcomes = sweep_module.sweep(str(tmp_path))
    counts = sweep_module.summary(outcomes)
    wrong = [f"{o.kind}: {o.case}: {o.detail}" for o in outcomes if o.kind in ("traceback", "accepted")]
    print(f"bad-input sweep: {counts}")
    assert counts["cases"] >= 50
    assert counts["traceback"] == 0 and counts["accepted"] == 0, (
        f"{counts['traceback']} traceback(s), {counts['accepted']} accepted:\n  " + "\n  ".join(wrong))
