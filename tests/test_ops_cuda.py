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
    # The synchronous checks (AVIDFAST_SYNC_CHECKS=1): ValueError at the call itself.
    from avidfast import _C
    _C._set_value_checks(0)
    try:
        _bad_indices_raise()
    finally:
        _C._set_value_checks(-1)


def _bad_indices_raise():
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


# ---------------------------------------------------------------------------------------------
# Issue 20: what reading the code cannot show. Shared-memory boundaries of the launch plans
# (tests/test_launch_plan.py checks the plans on the CPU; these launch them), the multi-tile scan
# of memory_update_, the rest of the dtype matrix, device and stream handling, large shapes, the
# device-side value checks and the absence of host syncs.


def _nce_case(x_dtype, memory_dtype, dim, positives, negatives, batch=3, num_items=300):
    memory = unit_rows(num_items, dim, memory_dtype)
    x = unit_rows(batch, dim, x_dtype)
    pos = torch.randint(0, num_items, (batch, positives))
    neg = torch.randint(0, num_items, (batch, negatives))
    weights = torch.rand(batch, dtype=torch.float64 if x_dtype == torch.float64 else torch.float32)
    got, expected, grad, grad_ref = _nce_both(x, memory, pos, neg, 1.7, 1.7, weights)
    tol = 1e-10 if x_dtype == torch.float64 else 1e-4
    _close(got, expected, tol)
    _close(grad, grad_ref, _grad_tol(x_dtype, tol))


@pytest.mark.parametrize("dim", [1536, 2048, 3072, 4096, 6144])
@pytest.mark.parametrize("terms", [2, 5, 17, 20, 25, 4097])
def test_nce_shared_memory_boundary_float32(dim, terms):
    # x and the warps' accumulators fill the 48 KiB next to the kernel's static warp_loss here.
    _nce_case(torch.float32, torch.float32, dim, 1, terms - 1)


@pytest.mark.parametrize("dim", [1024, 2048, 3072])
@pytest.mark.parametrize("terms", [2, 5, 17, 20, 25, 4097])
def test_nce_shared_memory_boundary_float64(dim, terms):
    _nce_case(torch.float64, torch.float64, dim, 1, terms - 1)


@pytest.mark.parametrize("memory_dtype, dims", [
    (torch.float32, [11768, 11769, 12288, 12289]),
    (torch.bfloat16, [11769, 12288]),
    (torch.float64, [5880, 5881, 6144]),
])
def test_memory_update_shared_memory_boundary(memory_dtype, dims):
    # A row of D row_t beside the kernel's 2080 (2112 for float64) static bytes.
    for dim in dims:
        memory = unit_rows(20, dim, memory_dtype)
        idx = torch.tensor([3, 7, 3, 19, 0])
        x = torch.randn(5, dim)
        expected = memory.clone()
        memory_update_(expected, idx, x, 0.6)
        got = memory.to(DEV)
        memory_update_(got, idx.to(DEV), x.to(DEV), 0.6)
        _close(got, expected, 1e-12 if memory_dtype == torch.float64 else 8e-3)


@pytest.mark.parametrize("batch", [1025, 3000, 4096, 4097])
def test_memory_update_duplicates_across_scan_tiles(batch):
    # D = 128: 128 threads, scan tiles of 1024 batch rows; 4097 takes the sort path. Index 5
    # repeats at both sides of every tile boundary, index 6 at the first and last row.
    num_items, dim = 10_000, 128
    memory = unit_rows(num_items, dim)
    idx = torch.randperm(num_items)[:batch]
    idx[(idx == 5) | (idx == 6)] = 9999
    for position in (0, 1023, 1024, 2047, 2048, 3071, 3072, batch - 1):
        if position < batch:
            idx[position] = 5
    idx[1] = 6
    idx[batch - 2] = 6
    x = torch.randn(batch, dim)
    expected = memory.clone()
    memory_update_(expected, idx, x, 0.3)
    got = memory.to(DEV)
    memory_update_(got, idx.to(DEV), x.to(DEV), 0.3)
    _close(got, expected, 2e-6)


DTYPE_MATRIX = [
    # x dtype, memory dtype: the pairs FLOAT_CASES leaves out
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.float64, torch.float32),
    (torch.float64, torch.bfloat16),
    (torch.float64, torch.float16),
]


@pytest.mark.parametrize("x_dtype, memory_dtype", DTYPE_MATRIX)
@pytest.mark.parametrize("words", [1, 2, 4, 8])
def test_rows_kernel_dtype_matrix_and_vector_widths(x_dtype, memory_dtype, words):
    # D = words * 32 lanes * (16 bytes / element size): each lane holds `words` 16-byte words.
    dim = words * 32 * (16 // memory_dtype.itemsize)
    tol = 1e-10 if x_dtype == torch.float64 and memory_dtype == torch.float64 else 2e-4
    num_items, batch = 400, 4
    memory = unit_rows(num_items, dim, memory_dtype)
    x = unit_rows(batch, dim, x_dtype)
    idx = torch.randint(0, num_items, (batch, 37))
    weights = torch.randn(batch, 37, dtype=torch.float64 if x_dtype == torch.float64 else torch.float32)
    x_cpu = x.clone().requires_grad_()
    expected = memory_scores(x_cpu, memory, idx, TEMPERATURE)
    expected.backward(weights)
    x_dev = x.to(DEV).requires_grad_()
    got = memory_scores(x_dev, memory.to(DEV), idx.to(DEV), TEMPERATURE)
    got.backward(weights.to(DEV))
    _close(got, expected, tol)
    _close(x_dev.grad, x_cpu.grad, _grad_tol(x_dtype, tol) if x_dtype != torch.float16 else 2e-3)
    _nce_case(x_dtype, memory_dtype, dim, 2, 35)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_inputs_on_the_second_device_while_the_first_is_current():
    dev1 = torch.device("cuda:1")
    num_items, dim, batch = 500, 128, 6
    memory = unit_rows(num_items, dim)
    x = unit_rows(batch, dim)
    pos = torch.randint(0, num_items, (batch,))
    with torch.cuda.device(0):
        neg = sample_negatives(pos.to(dev1), num_items, 50, 3, torch.tensor(4, device=dev1))
        assert neg.device == dev1
        assert torch.equal(neg.cpu(), sample_negatives(pos, num_items, 50, 3, 4))
        loss = nce_memory_loss(x.to(dev1), memory.to(dev1), pos.to(dev1), neg, 0.1,
                               torch.tensor(1.5, device=dev1), reduction="none")
        _close(loss, nce_memory_loss(x, memory, pos, neg.cpu(), 0.1, 1.5, reduction="none"), 1e-5)
        scores = memory_scores(x.to(dev1), memory.to(dev1), neg, 0.1)
        _close(scores, memory_scores(x, memory, neg.cpu(), 0.1), 1e-5)
        bank = memory.to(dev1)
        memory_update_(bank, pos.to(dev1), x.to(dev1), 0.5)
        expected = memory.clone()
        memory_update_(expected, pos, x, 0.5)
        _close(bank, expected, 1e-6)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(dev1)


def test_launches_follow_the_current_stream():
    # Every kernel must run on the current stream: work queued behind a long kernel on a side
    # stream must see the inputs written there, and the results must be complete once that
    # stream is synchronised.
    num_items, dim, batch = 2000, 128, 64
    memory = unit_rows(num_items, dim)
    x = unit_rows(batch, dim)
    pos = torch.randint(0, num_items, (batch,))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device=DEV)
        for _ in range(4):
            big = big @ big  # keeps the side stream busy
        memory_dev, x_dev, pos_dev = memory.to(DEV), x.to(DEV), pos.to(DEV)
        neg = sample_negatives(pos_dev, num_items, 300, 1, torch.tensor(2, device=DEV))
        loss = nce_memory_loss(x_dev, memory_dev, pos_dev, neg, 0.1, torch.tensor(1.2, device=DEV),
                               reduction="none")
        memory_update_(memory_dev, pos_dev, x_dev, 0.5)
    side.synchronize()
    neg_cpu = sample_negatives(pos, num_items, 300, 1, 2)
    assert torch.equal(neg.cpu(), neg_cpu)
    _close(loss, nce_memory_loss(x, memory, pos, neg_cpu, 0.1, 1.2, reduction="none"), 1e-5)
    expected = memory.clone()
    memory_update_(expected, pos, x, 0.5)
    _close(memory_dev, expected, 1e-6)


def test_sample_negatives_at_audioset_scale():
    # B = 4096 rows, K = 16384 draws, N = 1,784,108 items, P = 32 exclusions: bit for bit.
    batch, negatives, num_items, width = 4096, 16384, 1_784_108, 32
    pos = torch.randint(0, num_items, (batch,))
    exclude = _sorted_exclude(batch, width, num_items, pos)
    expected = sample_negatives(pos, num_items, negatives, 12345, 2**33 + 1, exclude, row_offset=7)
    got = sample_negatives(pos.to(DEV), num_items, negatives, 12345, torch.tensor(2**33 + 1, device=DEV),
                           exclude.to(DEV), row_offset=7)
    assert torch.equal(got.cpu(), expected)


# ---------------------------------------------------------------------------------------------
# Value checks on the device (csrc/ops/device_errors.h) and no host syncs in the hot path

from avidfast import _C  # noqa: E402
from avidfast.ops import check_errors  # noqa: E402

CHECK_MODES = {"host": 0, "device": 1, "off": 2}


@pytest.fixture
def value_checks():
    """Sets the value-check mode of CUDA tensors for one test (then back to the environment's)."""
    check_errors()  # nothing pending from an earlier test
    yield lambda mode: _C._set_value_checks(CHECK_MODES[mode])
    _C._set_value_checks(-1)
    torch.cuda.synchronize()
    try:
        check_errors()
    except ValueError:
        pass


def _loss_step(memory, x, index, z, step):
    """One loss step on device tensors: negatives, NCE loss and gradient, bank update."""
    neg = sample_negatives(index, memory.shape[0], 64, 0, step)
    loss, grad = torch.ops.avidfast.nce_memory_loss(x, memory, index[:, None], neg, 0.07, z)
    memory_update_(memory, index, x, 0.5)
    return loss, grad


def test_no_host_sync_in_the_step(value_checks):
    value_checks("device")
    memory = unit_rows(1000, 128).to(DEV)
    x = unit_rows(32, 128).to(DEV)
    index = torch.randperm(1000, device=DEV)[:32]
    z, step = torch.tensor(1.3, device=DEV, dtype=torch.float64), torch.tensor(5, device=DEV)
    _loss_step(memory, x, index, z, step)  # allocations and first-use work outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loss_step(memory, x, index, z, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The synchronous checks (AVIDFAST_SYNC_CHECKS=1) do sync: the debug mode sees them.
    value_checks("host")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            _loss_step(memory, x, index, z, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_step_captures_into_a_cuda_graph(value_checks):
    value_checks("device")
    memory = unit_rows(1000, 128).to(DEV)
    x = unit_rows(32, 128).to(DEV)
    index = torch.randperm(1000, device=DEV)[:32]
    z, step = torch.tensor(1.3, device=DEV, dtype=torch.float64), torch.tensor(5, device=DEV)
    eager_memory = memory.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _loss_step(memory.clone(), x, index, z, step)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = _loss_step(memory, x, index, z, step)
    graph.replay()
    eager_loss, eager_grad = _loss_step(eager_memory, x, index, z, step)
    torch.cuda.synchronize()
    assert torch.equal(loss, eager_loss) and torch.equal(grad, eager_grad)
    assert torch.equal(memory, eager_memory)


def test_bad_values_are_reported_at_the_next_call(value_checks):
    value_checks("device")
    memory = unit_rows(20, 16).to(DEV)
    x = unit_rows(3, 16).to(DEV)
    good = torch.tensor([[0, 1], [1, 2], [3, 4]], device=DEV)
    bad = torch.tensor([[0, 20], [1, 2], [3, 4]], device=DEV)
    loss = nce_memory_loss(x, memory, good, bad, 0.1, torch.tensor(1.0, device=DEV), reduction="none")
    assert torch.isnan(loss).cpu().tolist() == [True, False, False]  # the row was skipped
    with pytest.raises(ValueError, match=r"nce_memory_loss: neg_idx must lie in \[0, 20\).*holds 20"):
        check_errors()
    check_errors()  # reported once
    # Without check_errors(): the next avidfast call raises (once the kernel has written).
    memory_update_(memory, torch.tensor([0, 5, 20], device=DEV), x, 0.5)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"memory_update_: idx must lie in \[0, 20\).*holds 20"):
        memory_scores(x, memory, good, 0.1)
    cases = [
        (lambda: memory_scores(x, memory, -bad, 0.1), r"memory_scores: idx must lie in \[0, 20\)"),
        (lambda: nce_memory_loss(x, memory, bad, good, 0.1, torch.tensor(1.0, device=DEV)),
         r"nce_memory_loss: pos_idx .*holds 20"),
        (lambda: nce_memory_loss(x, memory, good, good, 0.1, torch.tensor(-2.0, device=DEV)),
         r"Z \(the partition estimate\) must be positive and finite, got -2"),
        (lambda: sample_negatives(torch.tensor([0, 20], device=DEV), 20, 3, 0, 0), r"pos must lie in \[0, 20\)"),
        (lambda: sample_negatives(torch.tensor([0, 1], device=DEV), 20, 3, 0, torch.tensor(-4, device=DEV)),
         r"step must be >= 0, got -4"),
        (lambda: sample_negatives(torch.tensor([0, 1], device=DEV), 20, 3, 0, 0,
                                  torch.tensor([[5, 2], [1, 3]], device=DEV)), r"row 0 is not"),
        (lambda: sample_negatives(torch.tensor([0, 1], device=DEV), 20, 3, 0, 0,
                                  torch.tensor([[2, 25], [1, 3]], device=DEV)), r"exclude must lie in \[0, 20\)"),
    ]
    for call, message in cases:
        call()
        with pytest.raises(ValueError, match=message):
            check_errors()


def test_bad_values_raise_at_the_call_with_sync_checks(value_checks):
    value_checks("host")
    memory = unit_rows(20, 16).to(DEV)
    x = unit_rows(3, 16).to(DEV)
    bad = torch.tensor([[0, 20], [1, 2], [3, 4]], device=DEV)
    with pytest.raises(ValueError, match=r"holds values in \[0, 20\]"):
        memory_scores(x, memory, bad, 0.1)
    with pytest.raises(ValueError, match="Z"):
        nce_memory_loss(x, memory, bad.clamp(max=19), bad.clamp(max=19), 0.1, torch.tensor(0.0, device=DEV))
    check_errors()  # nothing was recorded on the device
