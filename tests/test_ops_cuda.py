"""The CUDA kernels against the CPU kernels, on fresh random inputs.

Every CUDA op must compute what its CPU op computes: sample_negatives bit-identically, the
floating ops up to accumulation order. Skipped as a whole where no CUDA device is visible.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device visible: the CUDA kernels are tested on a machine with a GPU "
        "(build with AVIDFAST_CUDA=1)",
        allow_module_level=True,
    )

from avidfast.ops import (  # noqa: E402
    has_cuda_kernels,
    memory_scores,
    memory_update_,
    nce_memory_loss,
    sample_negatives,
)
from conftest import unit_rows  # noqa: E402

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")
TEMPERATURE = 0.07


def test_cuda_kernels_are_built():
    assert has_cuda_kernels(), (
        "a CUDA device is visible but avidfast._C has no CUDA kernels; rebuild with AVIDFAST_CUDA=1"
    )


def _close(actual, expected, tol):
    """Compare on the CPU in float64, with atol relative to the expected values' magnitude."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1.0))


def _memory(num_items, dim, dtype, misaligned=False):
    """Random unit rows; misaligned=True puts the bank one element past an aligned address."""
    rows = unit_rows(num_items, dim, dtype)
    if not misaligned:
        return rows
    flat = torch.empty(num_items * dim + 1, dtype=dtype)
    bank = flat[1:].view(num_items, dim)
    bank.copy_(rows)
    assert bank.is_contiguous() and bank.storage_offset() == 1
    return bank


def _to_cuda_bank(bank):
    """The bank on the device with the same storage offset (so a misaligned bank stays so)."""
    if bank.storage_offset() == 0:
        return bank.to(DEV)
    flat = torch.empty(bank.numel() + bank.storage_offset(), dtype=bank.dtype, device=DEV)
    out = flat[bank.storage_offset():].view(bank.shape)
    out.copy_(bank)
    return out


# ---------------------------------------------------------------------------------------------
# sample_negatives: bit-identical indices


def _sorted_exclude(batch, width, num_items, pos):
    exclude = torch.randint(0, num_items, (batch, width))
    if width > 1:
        # Make some exclusions coincide with the row's own index and with each other.
        exclude[:, 0] = pos
        exclude[: batch // 2, 1] = exclude[: batch // 2, 0]
    return torch.sort(exclude, dim=1).values


@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("seed", [0, 987654321, 2**40 + 7, -3])
@pytest.mark.parametrize("step", [0, 1, 2**33 + 5])
@pytest.mark.parametrize("row_offset", [0, 37])
def test_sample_negatives_identical(with_exclude, seed, step, row_offset):
    batch, num_items, num_negatives = 33, 1000, 64
    pos = torch.randint(0, num_items, (batch,))
    exclude = _sorted_exclude(batch, 6, num_items, pos) if with_exclude else None
    expected = sample_negatives(pos, num_items, num_negatives, seed, step, exclude, row_offset=row_offset)
    cuda_exclude = exclude.to(DEV) if exclude is not None else None
    for step_arg in (step, torch.tensor(step), torch.tensor(step, device=DEV)):
        got = sample_negatives(pos.to(DEV), num_items, num_negatives, seed, step_arg, cuda_exclude,
                               row_offset=row_offset)
        assert got.device.type == "cuda" and got.dtype == torch.int64
        assert got.shape == (batch, num_negatives)
        assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("width", [0, 1, 6])
def test_sample_negatives_tight_exclusions(width):
    # num_negatives = num_items - P - 2 (the largest allowed): most of the range is excluded.
    batch, num_items = 40, 20
    num_negatives = num_items - width - 2
    pos = torch.randint(0, num_items, (batch,))
    exclude = _sorted_exclude(batch, width, num_items, pos) if width else torch.empty(batch, 0, dtype=torch.long)
    for seed in range(3):
        expected = sample_negatives(pos, num_items, num_negatives, seed, 11, exclude)
        got = sample_negatives(pos.to(DEV), num_items, num_negatives, seed, 11, exclude.to(DEV))
        assert torch.equal(got.cpu(), expected)
        got = got.cpu()
        assert int(got.min()) >= 0 and int(got.max()) < num_items
        assert not (got == pos[:, None]).any()
        for b in range(batch):
            assert not set(got[b].tolist()) & set(exclude[b].tolist())


def test_sample_negatives_many_draws_and_empty_batch():
    pos = torch.randint(0, 10**6, (3,))
    expected = sample_negatives(pos, 10**6, 5000, 5, 3, row_offset=10**9)
    got = sample_negatives(pos.to(DEV), 10**6, 5000, 5, 3, row_offset=10**9)
    assert torch.equal(got.cpu(), expected)
    empty = sample_negatives(torch.empty(0, dtype=torch.long, device=DEV), 100, 7, 0, 0)
    assert empty.shape == (0, 7) and empty.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# memory_scores (forward and x-gradient)

FLOAT_CASES = [
    # memory dtype, x dtype, tolerance
    (torch.float32, torch.float32, 2e-5),
    (torch.bfloat16, torch.float32, 2e-5),
    (torch.float16, torch.float32, 2e-5),
    (torch.float32, torch.bfloat16, 2e-5),
    (torch.bfloat16, torch.bfloat16, 2e-5),
    (torch.float16, torch.bfloat16, 2e-5),
    (torch.float64, torch.float64, 1e-12),
    (torch.float64, torch.float32, 2e-5),
]

# (dim, misaligned): 128 and 96 take the vector path, 1024 its widest variant, 33 / 1 and a
# misaligned bank the scalar fallback.
SHAPES = [(128, False), (96, False), (1024, False), (33, False), (1, False), (128, True)]


def _grad_tol(x_dtype, tol):
    # x-gradients are returned in x's dtype: bfloat16 rounding may differ by one ulp.
    return 1e-2 if x_dtype == torch.bfloat16 else tol * 10


@pytest.mark.parametrize("memory_dtype, x_dtype, tol", FLOAT_CASES)
@pytest.mark.parametrize("dim, misaligned", SHAPES)
@pytest.mark.parametrize("batch, count", [(5, 300), (600, 3)])
def test_memory_scores_matches_cpu(memory_dtype, x_dtype, tol, dim, misaligned, batch, count):
    num_items = 257
    memory = _memory(num_items, dim, memory_dtype, misaligned)
    x = unit_rows(batch, dim, x_dtype)
    idx = torch.randint(0, num_items, (batch, count))
    weights = torch.randn(batch, count, dtype=torch.float64 if x_dtype == torch.float64 else torch.float32)

    x_cpu = x.clone().requires_grad_()
    expected = memory_scores(x_cpu, memory, idx, TEMPERATURE)
    expected.backward(weights)

    x_dev = x.to(DEV).requires_grad_()
    got = memory_scores(x_dev, _to_cuda_bank(memory), idx.to(DEV), TEMPERATURE)
    got.backward(weights.to(DEV))

    assert got.dtype == expected.dtype and got.shape == expected.shape
    _close(got, expected, tol)
    assert x_dev.grad.dtype == x_dtype
    _close(x_dev.grad, x_cpu.grad, _grad_tol(x_dtype, tol))


def test_memory_scores_large_dim_and_noncontiguous_x():
    # 13000 float32 columns do not fit in shared memory: x and the accumulators go to global memory.
    num_items, dim, batch, count = 40, 13000, 3, 50
    memory = unit_rows(num_items, dim)
    wide = unit_rows(batch, dim + 3)
    idx = torch.randint(0, num_items, (batch, count))
    grad_scores = torch.randn(batch, count)
    x_dev = wide.to(DEV)[:, 1 : dim + 1]
    assert not x_dev.is_contiguous()
    x = wide[:, 1 : dim + 1].contiguous()
    ops = torch.ops.avidfast
    _close(ops.memory_scores(x_dev, memory.to(DEV), idx.to(DEV), TEMPERATURE),
           ops.memory_scores(x, memory, idx, TEMPERATURE), 2e-5)
    _close(ops.memory_scores_backward(grad_scores.to(DEV), memory.to(DEV), idx.to(DEV), TEMPERATURE),
           ops.memory_scores_backward(grad_scores, memory, idx, TEMPERATURE), 2e-4)
    # A non-contiguous grad_scores too.
    wide_grad = torch.randn(batch, 2 * count)
    _close(ops.memory_scores_backward(wide_grad.to(DEV)[:, ::2], memory.to(DEV), idx.to(DEV), TEMPERATURE),
           ops.memory_scores_backward(wide_grad[:, ::2], memory, idx, TEMPERATURE), 2e-4)


def test_memory_scores_empty():
    memory = unit_rows(10, 8).to(DEV)
    x = unit_rows(4, 8).to(DEV)
    assert memory_scores(x, memory, torch.empty(4, 0, dtype=torch.long, device=DEV), 0.1).shape == (4, 0)
    assert memory_scores(x[:0], memory, torch.empty(0, 5, dtype=torch.long, device=DEV), 0.1).shape == (0, 5)
    grad = torch.ops.avidfast.memory_scores_backward(
        torch.empty(4, 0, device=DEV), memory, torch.empty(4, 0, dtype=torch.long, device=DEV), 0.1
    )
    assert grad.shape == (4, 8) and not grad.any()


# ---------------------------------------------------------------------------------------------
# nce_memory_loss (per-row loss and x-gradient)


def _nce_both(x, memory, pos, neg, z_cpu, z_dev, weights):
    x_cpu = x.clone().requires_grad_()
    expected = nce_memory_loss(x_cpu, memory, pos, neg, TEMPERATURE, z_cpu, reduction="none")
    expected.backward(weights)
    x_dev = x.to(DEV).requires_grad_()
    got = nce_memory_loss(x_dev, _to_cuda_bank(memory), pos.to(DEV), neg.to(DEV), TEMPERATURE, z_dev,
                          reduction="none")
    got.backward(weights.to(DEV))
    return got, expected, x_dev.grad, x_cpu.grad


@pytest.mark.parametrize("memory_dtype, x_dtype, tol", FLOAT_CASES)
@pytest.mark.parametrize("dim, misaligned", SHAPES)
@pytest.mark.parametrize("batch, positives, negatives", [(4, 1, 2000), (300, 4, 50)])
def test_nce_memory_loss_matches_cpu(memory_dtype, x_dtype, tol, dim, misaligned, batch, positives,
                                     negatives):
    num_items = 3000
    memory = _memory(num_items, dim, memory_dtype, misaligned)
    x = unit_rows(batch, dim, x_dtype)
    pos = torch.randint(0, num_items, (batch, positives))
    neg = torch.randint(0, num_items, (batch, negatives))
    z = float(torch.empty(()).uniform_(0.5, 3.0))
    weights = torch.rand(batch, dtype=torch.float64 if x_dtype == torch.float64 else torch.float32)
    got, expected, grad, grad_ref = _nce_both(x, memory, pos, neg, z, z, weights)
    assert got.dtype == expected.dtype and got.shape == (batch,)
    # A row's loss sums up to 2000 terms: allow for float32 summation order.
    _close(got, expected, max(tol, 1e-4) if x_dtype != torch.float64 else tol)
    assert grad.dtype == x_dtype
    _close(grad, grad_ref, _grad_tol(x_dtype, tol))


@pytest.mark.parametrize(
    "make_z",
    [
        lambda z: (z, z),
        lambda z: (torch.tensor(z, dtype=torch.float32),) * 2,
        lambda z: (torch.tensor(z, dtype=torch.float64),) * 2,
        lambda z: (torch.tensor(z, dtype=torch.float32), torch.tensor(z, dtype=torch.float32, device=DEV)),
        lambda z: (torch.tensor(z, dtype=torch.float64), torch.tensor([z], dtype=torch.float64, device=DEV)),
    ],
    ids=["float", "cpu32", "cpu64", "cuda32", "cuda64"],
)
def test_nce_partition_on_host_or_device(make_z):
    num_items, dim, batch = 500, 64, 9
    memory = unit_rows(num_items, dim)
    x = unit_rows(batch, dim)
    pos = torch.randint(0, num_items, (batch, 2))
    neg = torch.randint(0, num_items, (batch, 120))
    z_cpu, z_dev = make_z(float(torch.empty(()).uniform_(0.5, 3.0)))
    got, expected, grad, grad_ref = _nce_both(x, memory, pos, neg, z_cpu, z_dev, torch.rand(batch))
    _close(got, expected, 2e-5)
    _close(grad, grad_ref, 2e-4)


def test_nce_large_dim_and_determinism():
    # 7000 float32 columns: x + one accumulator exceed 48 KiB of shared memory (global fallback).
    num_items, dim, batch = 60, 7000, 3
    memory = unit_rows(num_items, dim)
    x = unit_rows(batch, dim)
    pos = torch.randint(0, num_items, (batch, 1))
    neg = torch.randint(0, num_items, (batch, 40))
    got, expected, grad, grad_ref = _nce_both(x, memory, pos, neg, 1.3, 1.3, torch.rand(batch))
    _close(got, expected, 2e-5)
    _close(grad, grad_ref, 2e-4)
    # Fixed reduction order: the same inputs give bitwise the same outputs.
    memory = unit_rows(5000, 128).to(DEV)
    x = unit_rows(6, 128).to(DEV)
    pos = torch.randint(0, 5000, (6, 3), device=DEV)
    neg = torch.randint(0, 5000, (6, 4000), device=DEV)
    first = torch.ops.avidfast.nce_memory_loss(x, memory, pos, neg, 0.07, torch.tensor(1.0))
    for _ in range(3):
        again = torch.ops.avidfast.nce_memory_loss(x, memory, pos, neg, 0.07, torch.tensor(1.0))
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_nce_empty_batch():
    memory = unit_rows(10, 8).to(DEV)
    x = unit_rows(0, 8).to(DEV)
    empty = torch.empty(0, 2, dtype=torch.long, device=DEV)
    loss, grad = torch.ops.avidfast.nce_memory_loss(x, memory, empty, empty, 0.1, torch.tensor(1.0))
    assert loss.shape == (0,) and grad.shape == (0, 8)


# ---------------------------------------------------------------------------------------------
# memory_update_


UPDATE_CASES = [
    (torch.float32, 2e-6),
    (torch.bfloat16, 8e-3),
    (torch.float16, 1e-3),
    (torch.float64, 1e-12),
]


@pytest.mark.parametrize("memory_dtype, tol", UPDATE_CASES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dim", [128, 33, 300])
def test_memory_update_matches_cpu(memory_dtype, tol, x_dtype, momentum, dim):
    num_items, batch = 60, 40
    memory = unit_rows(num_items, dim, memory_dtype)
    # Few distinct indices, so most are repeated (some three or more times, not adjacent).
    idx = torch.randint(0, 15, (batch,))
    idx[[0, 9, 21]] = 4
    x = torch.randn(batch, dim).to(x_dtype)
    expected = memory.clone()
    memory_update_(expected, idx, x, momentum)
    got = memory.to(DEV)
    memory_update_(got, idx.to(DEV), x.to(DEV), momentum)
    _close(got, expected, tol)
    untouched = torch.ones(num_items, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(got.cpu()[untouched], memory[untouched])


@pytest.mark.parametrize("batch, dim", [(5000, 16), (6, 13000)])
def test_memory_update_sorted_path_and_large_dim(batch, dim):
    # batch > 4096 takes the sort-based path; 13000 float32 columns do not fit in shared memory.
    num_items = 300
    memory = unit_rows(num_items, dim)
    idx = torch.randint(0, num_items if batch > 100 else 3, (batch,))
    x = torch.randn(batch, dim)
    expected = memory.clone()
    memory_update_(expected, idx, x, 0.7)
    got = memory.to(DEV)
    memory_update_(got, idx.to(DEV), x.to(DEV), 0.7)
    _close(got, expected, 1e-5)


def test_memory_update_empty_batch():
    memory = unit_rows(10, 8).to(DEV)
    before = memory.clone()
    memory_update_(memory, torch.empty(0, dtype=torch.long, device=DEV), torch.empty(0, 8, device=DEV), 0.5)
    assert torch.equal(memory, before)


# ---------------------------------------------------------------------------------------------
# Bad indices


def test_bad_indices_raise_value_error_on_cuda():
    memory = unit_rows(20, 16).to(DEV)
    x = unit_rows(3, 16).to(DEV)
    bad = torch.tensor([[0, 20], [1, 2], [3, 4]], device=DEV)
    good = torch.tensor([[0, 1], [1, 2], [3, 4]], device=DEV)
    with pytest.raises(ValueError):
        memory_scores(x, memory, bad, 0.1)
    with pytest.raises(ValueError):
        nce_memory_loss(x, memory, good, -bad, 0.1, 1.0)
    with pytest.raises(ValueError):
        nce_memory_loss(x, memory, bad, good, 0.1, torch.tensor(1.0, device=DEV))
    with pytest.raises(ValueError):
        memory_update_(memory, torch.tensor([0, 5, 20], device=DEV), x, 0.5)
    with pytest.raises(ValueError):
        sample_negatives(torch.tensor([0, 20], device=DEV), 20, 3, 0, 0)


def test_unchecked_bad_indices_never_read_out_of_bounds():
    # With the host checks off, out-of-range rows must give NaN (scores, losses), add nothing to
    # the gradient, and be skipped by memory_update_, without any illegal access.
    script = textwrap.dedent(
        """
        import torch
        from avidfast.ops import memory_scores, memory_update_, nce_memory_loss
        dev = torch.device("cuda")
        n, d = 50, 64
        memory = torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=1)
        x = torch.nn.functional.normalize(torch.randn(3, d, device=dev), dim=1).requires_grad_()
        idx = torch.tensor([[0, 1, 2], [3, -7, 4], [5, 6, n + 10**9]], device=dev)
        scores = memory_scores(x, memory, idx, 0.1)
        nan = torch.isnan(scores).cpu()
        assert nan.tolist() == [[False] * 3, [False, True, False], [False, False, True]], nan
        scores.nan_to_num(0.0).sum().backward()
        ok = idx.clamp(0, n - 1)
        expected = (memory[ok] * (idx == ok)[..., None]).sum(1) / 0.1
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
        loss, grad = torch.ops.avidfast.nce_memory_loss(
            x.detach(), memory, idx[:, :1], idx[:, 1:], 0.1, torch.tensor(1.0, device=dev))
        assert torch.isnan(loss).cpu().tolist() == [False, True, True]
        assert torch.isfinite(grad).all()
        before = memory.clone()
        memory_update_(memory, torch.tensor([2, -1, n], device=dev), torch.randn(3, d, device=dev), 0.5)
        changed = (memory != before).any(1).cpu()
        assert changed.nonzero().flatten().tolist() == [2], changed
        torch.cuda.synchronize()
        print("ok")
        """
    )
    env = dict(os.environ, AVIDFAST_CHECK_INDICES="0", CUDA_LAUNCH_BLOCKING="1",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]
