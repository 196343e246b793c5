"""Issue 16 on CUDA: the in-place contract, non-finite rows without a sync, "last" duplicates and
MemoryNCE, against the CPU. Skipped as a whole where no CUDA device is visible."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device visible: these tests run on a machine with a GPU (build with AVIDFAST_CUDA=1)",
                allow_module_level=True)

from avidfast.losses import MemoryNCE  # noqa: E402
from avidfast.ops import memory_scores, memory_update_  # noqa: E402
from conftest import unit_rows  # noqa: E402

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")


def _bad_batch():
    idx = torch.tensor([3, 7, 3, 12, 20])
    x = torch.randn(5, 8)
    x[1, 4] = float("nan")
    x[3, 0] = float("inf")
    return idx, x


def test_version_counter_and_stale_bank_on_cuda():
    memory = unit_rows(30, 8).to(DEV)
    x = torch.randn(4, 8, device=DEV, requires_grad=True)
    scores = memory_scores(x, memory, torch.randint(0, 30, (4, 6), device=DEV), 0.1)
    before = memory._version
    memory_update_(memory, torch.tensor([1, 4], device=DEV), torch.randn(2, 8, device=DEV), 0.5)
    assert memory._version == before + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()


def test_nonfinite_rows_are_dropped_on_the_device_by_default():
    memory = unit_rows(30, 8)
    idx, x = _bad_batch()
    ours = memory.to(DEV)
    memory_update_(ours, idx.to(DEV), x.to(DEV), 0.5)  # no error: raising would need a sync
    expected = memory.clone()
    keep = torch.tensor([0, 2, 4])
    memory_update_(expected, idx[keep], x[keep], 0.5)
    torch.testing.assert_close(ours.cpu(), expected, rtol=0, atol=1e-6)


def test_check_finite_raises_on_cuda(monkeypatch):
    monkeypatch.setenv("AVIDFAST_CHECK_FINITE", "1")
    memory = unit_rows(30, 8).to(DEV)
    before = memory.clone()
    idx, x = _bad_batch()
    with pytest.raises(ValueError, match=r"row 1 of x \(memory index 7\) holds NaN or inf"):
        memory_update_(memory, idx.to(DEV), x.to(DEV), 0.5)
    assert torch.equal(memory, before)


SYNC_FREE = textwrap.dedent(
    """
    import torch
    from avidfast.ops import memory_update_
    memory = torch.nn.functional.normalize(torch.randn(30, 8, device="cuda"), dim=1)
    idx = torch.tensor([3, 7, 3], device="cuda")
    x = torch.randn(3, 8, device="cuda")
    x[1, 0] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    memory_update_(memory, idx, x, 0.5)                       # the default: no synchronisation
    memory_update_(memory, idx, x, 0.5, duplicates="last")
    torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(memory).all()
    print("OK")
    """
)


def test_the_default_check_adds_no_synchronisation():
    # With the index range checks off (their device-to-host copy is the one that exists), the
    # update with a NaN row must run without any synchronisation.
    env = dict(os.environ, AVIDFAST_CHECK_INDICES="0")
    result = subprocess.run([sys.executable, "-c", SYNC_FREE], capture_output=True, text=True, env=env, timeout=300,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("memory_dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_last_rule_matches_cpu(memory_dtype, tol):
    memory = unit_rows(200, 64, memory_dtype)
    idx = torch.randint(0, 50, (300,))
    x = torch.randn(300, 64)
    cpu, gpu = memory.clone(), memory.to(DEV)
    memory_update_(cpu, idx, x, 0.5, duplicates="last")
    memory_update_(gpu, idx.to(DEV), x.to(DEV), 0.5, duplicates="last")
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("objective", ["nce", "infonce", "softmax"])
def test_memory_nce_matches_cpu(objective):
    cpu = MemoryNCE(500, 32, 64, objective=objective, seed=4)
    gpu = MemoryNCE(500, 32, 64, objective=objective, seed=4).to(DEV)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, index = torch.randn(16, 32, generator=g), torch.randperm(500, generator=g)[:16]
        xc, xg = x.clone().requires_grad_(), x.to(DEV).requires_grad_()
        lc, _ = cpu(xc, index)
        lg, _ = gpu(xg, index.to(DEV))
        lc.backward()
        lg.backward()
        torch.testing.assert_close(lg.cpu(), lc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.bank.memory.cpu(), cpu.bank.memory, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.Z.cpu(), cpu.Z, rtol=1e-6, atol=0)
