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
