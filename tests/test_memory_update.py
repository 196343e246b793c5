import pytest
import torch

from avidfast.ops import memory_scores, memory_update_, nce_memory_loss, reference
from conftest import unit_rows


@pytest.mark.parametrize(
    "memory_dtype, tol",
    [(torch.float32, 1e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3), (torch.float64, 1e-12)],
)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_equals_reference_with_repeated_indices(memory_dtype, tol, x_dtype):
    memory = unit_rows(50, 24, memory_dtype)
    idx = torch.tensor([3, 7, 3, 49, 0, 7, 3, 12])
    x = torch.randn(8, 24).to(x_dtype)
    ours = memory.clone()
    memory_update_(ours, idx, x, 0.5)
    ref = memory.clone()
    reference.memory_update_(ref, idx, x, 0.5)
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(ours[untouched], memory[untouched])
    assert torch.allclose(ours[idx].double().norm(dim=1), torch.ones(8, dtype=torch.float64), atol=tol * 4)


def test_repeats_apply_in_batch_order():
    memory = unit_rows(4, 6)
    a, b = torch.randn(2, 6)
    once = memory.clone()
    memory_update_(once, torch.tensor([1, 1]), torch.stack([a, b]), 0.3)
    twice = memory.clone()
    memory_update_(twice, torch.tensor([1]), a[None], 0.3)
    memory_update_(twice, torch.tensor([1]), b[None], 0.3)
    torch.testing.assert_close(once, twice, rtol=0, atol=1e-7)
    swapped = memory.clone()
    memory_update_(swapped, torch.tensor([1, 1]), torch.stack([b, a]), 0.3)
    assert not torch.allclose(swapped[1], once[1])


def test_deterministic():
    memory = unit_rows(1000, 64)
    idx = torch.randint(0, 100, (512,))
    x = torch.randn(512, 64)
    first, second = memory.clone(), memory.clone()
    memory_update_(first, idx, x, 0.5)
    memory_update_(second, idx, x, 0.5)
    assert torch.equal(first, second)


def test_opcheck():
    memory = unit_rows(30, 8)
    torch.library.opcheck(
        torch.ops.avidfast.memory_update_.default, (memory, torch.tensor([1, 5, 1]), torch.randn(3, 8), 0.5)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(idx=torch.tensor([0, 30])), r"idx must lie in \[0, 30\)"),
        (dict(idx=torch.tensor([[0, 1]])), "idx must be 1-D"),
        (dict(idx=torch.tensor([0])), "idx has 1 rows"),
        (dict(x=torch.randn(2, 9)), "x has dim 9"),
        (dict(momentum=1.5), "momentum must lie in"),
        (dict(momentum=-0.1), "momentum must lie in"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    args = dict(memory=unit_rows(30, 8), idx=torch.tensor([0, 1]), x=torch.randn(2, 8), momentum=0.5)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        memory_update_(**args)


# --- PyTorch's in-place contract: version counter, stale saved tensors, leaves (issue 16) -------

def _scores_then_update(memory, x, idx, update):
    """memory_scores (which saves the bank for backward), then an in-place update of the bank."""
    scores = memory_scores(x, memory, idx, 0.1)
    update(memory)
    return scores


def _update(memory):
    memory_update_(memory, torch.tensor([1, 4]), torch.randn(2, memory.shape[1]), 0.5)


def test_every_call_bumps_the_version_counter_once():
    memory = unit_rows(30, 8)
    for expected, kwargs in enumerate([{}, dict(duplicates="last"), dict(nonfinite="skip"),
                                       dict(nonfinite="write")], start=1):
        memory_update_(memory, torch.tensor([3, 3, 7]), torch.randn(3, 8), 0.5, **kwargs)
        assert memory._version == expected, kwargs
    torch.ops.avidfast.memory_update_(memory, torch.tensor([2]), torch.randn(1, 8), 0.5)
    assert memory._version == 5


def test_backward_through_a_stale_bank_raises_as_for_pytorch_inplace_ops():
    memory, x = unit_rows(30, 8), torch.randn(4, 8, requires_grad=True)
    idx = torch.randint(0, 30, (4, 6))
    scores = _scores_then_update(memory, x, idx, _update)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()
    # PyTorch's own in-place op on the same graph says the same thing.
    other = unit_rows(30, 8)
    scores = _scores_then_update(other, x, idx, lambda m: m.index_copy_(0, torch.tensor([1]), unit_rows(1, 8)))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_update_bumps_the_version_counter(backend):
    torch._dynamo.reset()
    memory, x = unit_rows(30, 8), torch.randn(4, 8, requires_grad=True)
    idx = torch.randint(0, 30, (4, 6))
    compiled_update = torch.compile(_update, backend=backend, fullgraph=True)
    before = memory._version
    compiled_update(memory)
    assert memory._version > before
    scores = _scores_then_update(memory, x, idx, compiled_update)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scores.sum().backward()


def test_compiled_step_that_reads_a_bank_it_updates_before_backward_raises():
    torch._dynamo.reset()
    memory, x = unit_rows(30, 8), torch.randn(4, 8, requires_grad=True)
    idx = torch.randint(0, 30, (4, 6))

    def step(x, memory):
        return _scores_then_update(memory, x, idx, _update).sum()

    # AOTAutograd traces the backward pass while compiling, so the error comes at the first call.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.compile(step, backend="aot_eager")(x, memory).backward()


def test_nce_memory_loss_allows_the_update_before_backward():
    # Its forward pass computes the gradient, so the bank is not saved: this order is the AVID
    # step's, and the gradient is that of the rows as they were in the forward pass.
    memory, x = unit_rows(30, 8), unit_rows(4, 8).requires_grad_()
    pos, neg = torch.randint(0, 30, (4,)), torch.randint(0, 30, (4, 6))
    expected, = torch.autograd.grad(reference.nce_memory_loss(x, memory.clone(), pos, neg, 0.1, 2.0), x)
    loss = nce_memory_loss(x, memory, pos, neg, 0.1, 2.0)
    memory_update_(memory, pos, x, 0.5)
    loss.backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, dict(duplicates="last")])
def test_a_leaf_that_requires_grad_is_refused_under_grad_mode_only(kwargs):
    parameter = torch.nn.Parameter(unit_rows(30, 8))
    before = parameter.detach().clone()
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place operation"):
        memory_update_(parameter, torch.tensor([1]), torch.randn(1, 8), 0.5, **kwargs)
    assert torch.equal(parameter.detach(), before)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        torch.ops.avidfast.memory_update_(parameter, torch.tensor([1]), torch.randn(1, 8), 0.5)
    with torch.no_grad():  # as parameter.add_(...) is allowed under no_grad (optimisers)
        memory_update_(parameter, torch.tensor([1]), torch.randn(1, 8), 0.5, **kwargs)
    assert not torch.equal(parameter.detach()[1], before[1])


@pytest.mark.parametrize("kwargs", [{}, dict(duplicates="last")])
def test_a_bank_with_a_graph_is_refused(kwargs):
    base = unit_rows(30, 8).requires_grad_()
    memory = base * 1.0  # not a leaf, requires grad
    with pytest.raises(RuntimeError, match="memory_update_ has no derivative"):
        memory_update_(memory, torch.tensor([1]), torch.randn(1, 8), 0.5, **kwargs)


# --- repeated indices: batch order (default) or one write from the old row ("last") -------------

def _last_write_formula(memory, idx, x, m):
    """The index_select / mix / normalize / index_copy_ update of lemniscate's NCEAverage, CMC and
    mmselfsup's SimpleMemory, from their equations: every slot is written once, from its old row,
    by its last occurrence in the batch (what index_copy_ leaves on a CPU). float64."""
    out = memory.double().clone()
    for b, i in enumerate(idx.tolist()):  # later occurrences overwrite earlier ones
        row = m * memory[i].double() + (1 - m) * x[b].double()
        out[i] = row / row.norm().clamp_min(1e-12)
    return out


@pytest.mark.parametrize("memory_dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3), (torch.float64, 1e-12)])
@pytest.mark.parametrize("momentum", [0.5, 0.0, 1.0, 0.87])
def test_last_rule_equals_the_index_copy_formula(memory_dtype, tol, momentum):
    memory = unit_rows(40, 12, memory_dtype)
    idx = torch.tensor([5, 9, 5, 0, 9, 5, 39, 17])
    x = torch.randn(8, 12)
    ours = memory.clone()
    memory_update_(ours, idx, x, momentum, duplicates="last")
    torch.testing.assert_close(ours.double(), _last_write_formula(memory, idx, x, momentum), rtol=tol, atol=tol)
    sequential = memory.clone()
    memory_update_(sequential, idx, x, momentum)
    if 0 < momentum < 1:
        assert not torch.allclose(ours[5].double(), sequential[5].double(), atol=1e-3)


def test_rules_agree_without_repeated_indices():
    memory = unit_rows(100, 16)
    idx, x = torch.randperm(100)[:20], torch.randn(20, 16)
    a, b = memory.clone(), memory.clone()
    memory_update_(a, idx, x, 0.5)
    memory_update_(b, idx, x, 0.5, duplicates="last")
    torch.testing.assert_close(a, b, rtol=0, atol=2e-7)


def test_last_rule_checks_arguments():
    memory = unit_rows(30, 8)
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 30\)"):
        memory_update_(memory, torch.tensor([0, 30]), torch.randn(2, 8), 0.5, duplicates="last")
    with pytest.raises(ValueError, match="x has dim 9"):
        memory_update_(memory, torch.tensor([0, 1]), torch.randn(2, 9), 0.5, duplicates="last")
    with pytest.raises(ValueError, match="duplicates must be one of"):
        memory_update_(memory, torch.tensor([0]), torch.randn(1, 8), 0.5, duplicates="first")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        memory_update_(memory, torch.tensor([0]), torch.randn(1, 8), 0.5, nonfinite="ignore")


# --- rows of x with NaN or inf -------------------------------------------------------------------

def _bad_batch():
    idx = torch.tensor([3, 7, 3, 12, 20])
    x = torch.randn(5, 8)
    x[1, 4] = float("nan")
    x[3, 0] = float("inf")
    return idx, x


@pytest.mark.parametrize("duplicates", ["sequential", "last"])
def test_a_nonfinite_row_raises_with_its_row_and_index_and_writes_nothing(duplicates):
    memory = unit_rows(30, 8)
    before = memory.clone()
    idx, x = _bad_batch()
    with pytest.raises(ValueError, match=r"row 1 of x \(memory index 7\) holds NaN or inf \(2 such rows: 1, 3\); "
                                         "nothing was written"):
        memory_update_(memory, idx, x, 0.5, duplicates=duplicates)
    assert torch.equal(memory, before)


@pytest.mark.parametrize("duplicates", ["sequential", "last"])
def test_skip_applies_the_finite_rows_only(duplicates):
    memory = unit_rows(30, 8)
    idx, x = _bad_batch()
    ours, expected = memory.clone(), memory.clone()
    memory_update_(ours, idx, x, 0.5, nonfinite="skip", duplicates=duplicates)
    keep = torch.tensor([0, 2, 4])
    memory_update_(expected, idx[keep], x[keep], 0.5, duplicates=duplicates)
    assert torch.equal(ours, expected)  # exactly: rows 7 and 12 untouched
    assert torch.equal(ours[[7, 12]], memory[[7, 12]])


def test_write_lets_nan_into_the_bank():
    memory = unit_rows(30, 8)
    idx, x = _bad_batch()
    memory_update_(memory, idx, x, 0.5, nonfinite="write")
    assert torch.isnan(memory[7]).any() and torch.isfinite(memory[3]).all()


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.0])
def test_skip_without_host_sync_leaves_the_slot_up_to_a_renormalisation(momentum):
    # The CUDA (and torch.compile) path: a non-finite row is applied as an inert row instead of
    # being removed, so nothing waits for the device. Run here through torch.compile on the CPU.
    torch._dynamo.reset()
    memory = unit_rows(30, 8)
    idx, x = _bad_batch()
    ours, expected = memory.clone(), memory.clone()
    update = torch.compile(lambda m, i, v: memory_update_(m, i, v, momentum, nonfinite="skip"),
                           backend="aot_eager", fullgraph=True)
    update(ours, idx, x)
    keep = torch.tensor([0, 2, 4])
    memory_update_(expected, idx[keep], x[keep], momentum)
    torch.testing.assert_close(ours, expected, rtol=0, atol=4e-7)
    assert torch.isfinite(ours).all()


def test_compiled_raise_is_a_runtime_assertion():
    torch._dynamo.reset()
    memory = unit_rows(30, 8)
    before = memory.clone()
    update = torch.compile(lambda m, i, v: memory_update_(m, i, v, 0.5), backend="aot_eager", fullgraph=True)
    idx, x = _bad_batch()
    update(memory, idx[[0, 2]], x[[0, 2]])  # finite: compiles and runs
    assert not torch.equal(memory, before)
    written = memory.clone()
    with pytest.raises(RuntimeError, match="a row of x holds NaN or inf; nothing was written"):
        update(memory, idx, x)
    assert torch.equal(memory, written)
