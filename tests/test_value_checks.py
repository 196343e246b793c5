"""The value checks and their host syncs, on the CPU (csrc/ops/device_errors.h).

On CUDA tensors the operators check index ranges, Z, step and the order of `exclude` in the
kernels and report a bad value at a later call (or at avidfast.ops.check_errors()), without a
host sync; AVIDFAST_SYNC_CHECKS=1 checks them on the host at the call (a sync per check). A
CUDA-free mock measures the syncs: avidfast._C._treat_cpu_as_device(True) sends CPU tensors down
the path of device tensors, and _host_reads() counts the device-to-host reads the checks make.
The lazy report is driven by _inject_device_error (what a kernel writes). The CUDA side of it
runs in tests/test_ops_cuda.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from avidfast.losses import AVIDLoss, CMALoss
from avidfast.ops import check_errors, memory_scores, memory_update_, nce_memory_loss, sample_negatives
from conftest import unit_rows

_C = pytest.importorskip("avidfast._C")

HOST, DEVICE, OFF = 0, 1, 2
N, D, B, K = 1000, 32, 8, 64


@pytest.fixture
def mock():
    """CPU tensors on the device path; sets the mode; restores everything afterwards."""
    check_errors()
    _C._treat_cpu_as_device(True)
    yield lambda mode: _C._set_value_checks(mode)
    _C._treat_cpu_as_device(False)
    _C._set_value_checks(-1)
    try:
        check_errors()
    except ValueError:
        pass


def _reads(fn) -> int:
    before = _C._host_reads()
    fn()
    return _C._host_reads() - before


def _calls():
    memory = unit_rows(N, D)
    x = unit_rows(B, D)
    index = torch.randperm(N)[:B]
    neg = torch.randint(0, N, (B, K))
    z = torch.tensor(1.5, dtype=torch.float64)
    step = torch.tensor(3)
    exclude = torch.sort(torch.randint(0, N, (B, 4)), dim=1).values
    return {
        "sample_negatives": lambda: sample_negatives(index, N, K, 0, step),
        "sample_negatives with exclude": lambda: sample_negatives(index, N, K, 0, step, exclude),
        "nce_memory_loss": lambda: nce_memory_loss(x, memory, index, neg, 0.07, z),
        "memory_scores": lambda: memory_scores(x, memory, neg, 0.07),
        "memory_scores and backward":
            lambda: memory_scores(x.clone().requires_grad_(), memory, neg, 0.07).sum().backward(),
        "memory_update_": lambda: memory_update_(memory.clone(), index, x, 0.5),
    }


def _step(loss):
    video = torch.randn(B, D, requires_grad=True)
    audio = torch.randn(B, D, requires_grad=True)
    index = torch.randperm(N)[:B]

    def run():
        out = loss(video, audio, index)
        out[0].backward()
    return run


def _steps():
    cma = CMALoss(N, D, K, num_positives=4, num_negatives_within=16)
    cma.set_epoch(0)
    return {"AVIDLoss cross": _step(AVIDLoss(N, D, K, mode="cross")),
            "AVIDLoss joint": _step(AVIDLoss(N, D, K, mode="joint")),
            "CMALoss": _step(cma)}


# Host reads (each a stream sync on a GPU) with the synchronous checks: one per index tensor
# (min and max in one read), one per step, Z and exclude order. Before issue 20 every call made
# them (two per index tensor): sample_negatives 3 (6 with exclude), nce_memory_loss 5,
# memory_scores 2 (4 with its backward), memory_update_ 2.
SYNC_READS = {"sample_negatives": 2, "sample_negatives with exclude": 4, "nce_memory_loss": 3,
              "memory_scores": 1, "memory_scores and backward": 2, "memory_update_": 1}
# Per training step after the first (before issue 20: 17, 27 and 30).
SYNC_STEP_READS = {"AVIDLoss cross": 10, "AVIDLoss joint": 16, "CMALoss": 18}


def test_no_host_read_per_call_or_step_by_default(mock):
    assert _C._value_checks() == DEVICE or os.environ.get("AVIDFAST_SYNC_CHECKS") \
        or os.environ.get("AVIDFAST_CHECK_INDICES") == "0"
    mock(DEVICE)
    for name, call in _calls().items():
        assert _reads(call) == 0, name
    for name, step in _steps().items():
        step()  # the first step estimates Z
        assert _reads(step) == 0, name


def test_host_reads_of_the_synchronous_checks(mock):
    mock(HOST)
    assert {name: _reads(call) for name, call in _calls().items()} == SYNC_READS
    counts = {}
    for name, step in _steps().items():
        step()
        counts[name] = _reads(step)
    assert counts == SYNC_STEP_READS
    mock(OFF)
    assert all(_reads(call) == 0 for call in _calls().values())


def test_cpu_tensors_are_always_checked_at_the_call():
    _C._set_value_checks(DEVICE)
    try:
        before = _C._host_reads()
        with pytest.raises(ValueError, match=r"neg_idx must lie in \[0, 20\)"):
            nce_memory_loss(unit_rows(2, 4), unit_rows(20, 4), torch.tensor([0, 1]),
                            torch.tensor([[0, 20], [1, 2]]), 0.1, 1.0)
        assert _C._host_reads() == before  # reading a CPU tensor is no sync
    finally:
        _C._set_value_checks(-1)


def test_a_recorded_failure_raises_at_the_next_call_on_the_device_path(mock):
    mock(DEVICE)
    _C._inject_device_error(0, 4, 20, 20)  # nce_memory_loss: neg_idx
    calls = _calls()
    with pytest.raises(ValueError) as raised:
        calls["memory_update_"]()
    message = str(raised.value)
    assert message.startswith("an earlier call on cuda:0 found nce_memory_loss: neg_idx must lie in [0, 20) "
                              "(the memory's rows), but holds 20 (the loss of its batch row is NaN)")
    assert "AVIDFAST_SYNC_CHECKS=1" in message and "check_errors()" in message
    calls["memory_update_"]()  # reported once
    check_errors()


def test_check_errors_raises_a_recorded_failure_once():
    check_errors()  # nothing recorded: nothing raised
    _C._inject_device_error(1, 6, -3, 50)
    _C._inject_device_error(1, 3, 7, 50)  # the first failure wins
    # CPU tensors do not take the device path: a CPU call is not the one that reports it.
    memory_update_(unit_rows(5, 4), torch.tensor([1]), torch.randn(1, 4), 0.5)
    with pytest.raises(ValueError, match=r"cuda:1 found memory_update_: idx must lie in \[0, 50\) \(the memory's "
                                         r"rows\), but holds -3 \(no bank row was updated for it\)"):
        check_errors()
    check_errors()


@pytest.mark.parametrize("check, value, limit, expected", [
    (1, 99, 10, r"memory_scores: idx must lie in \[0, 10\) \(the memory's rows\), but holds 99"),
    (2, -1, 10, r"memory_scores_backward: idx must lie in \[0, 10\) .* holds -1 \(it added nothing"),
    (3, 10, 10, r"nce_memory_loss: pos_idx must lie in \[0, 10\)"),
    (5, int.from_bytes(torch.tensor([-2.5], dtype=torch.float64).numpy().tobytes(), "little", signed=True), 0,
     r"Z \(the partition estimate\) must be positive and finite, got -2.5"),
    (7, 12, 10, r"sample_negatives: pos must lie in \[0, 10\), but holds 12"),
    (8, -4, 10, r"sample_negatives: exclude must lie in \[0, 10\), but holds -4"),
    (9, 3, 0, r"every row of exclude must be sorted in ascending order .*row 3 is not"),
    (10, -7, 0, r"sample_negatives: step must be >= 0, got -7"),
    (11, 10, 10, r"cma_topk: queries must lie in \[0, 10\), but holds 10"),
])
def test_messages_name_the_operator_and_argument(check, value, limit, expected):
    _C._inject_device_error(0, check, value, limit)
    with pytest.raises(ValueError, match=expected):
        check_errors()


@pytest.mark.parametrize("env, mode", [
    ({}, DEVICE),
    ({"AVIDFAST_SYNC_CHECKS": "1"}, HOST),
    ({"AVIDFAST_SYNC_CHECKS": "0"}, DEVICE),
    ({"AVIDFAST_CHECK_INDICES": "0"}, OFF),
    ({"AVIDFAST_CHECK_INDICES": "0", "AVIDFAST_SYNC_CHECKS": "1"}, HOST),
])
def test_the_environment_selects_the_mode(env, mode):
    clean = {k: v for k, v in os.environ.items() if k not in ("AVIDFAST_SYNC_CHECKS", "AVIDFAST_CHECK_INDICES")}
    code = "import torch; from avidfast import _C; print(_C._value_checks())"
    result = subprocess.run([sys.executable, "-c", code], env=dict(clean, **env), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) == mode
