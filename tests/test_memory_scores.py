import pytest
import torch

from avidfast.ops import memory_scores, reference
from conftest import unit_rows

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("memory_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_equals_reference(memory_dtype, x_dtype):
    memory = unit_rows(300, 40, memory_dtype)
    x = unit_rows(9, 40, x_dtype)
    idx = torch.randint(0, 300, (9, 70))
    ours = memory_scores(x, memory, idx, 0.07)
    ref = reference.memory_scores(x, memory, idx, 0.07)
    assert ours.dtype == (torch.float64 if x_dtype == torch.float64 else torch.float32)
    tol = max(TOLERANCE[memory_dtype], TOLERANCE[x_dtype])
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol / 0.07)


def test_gradient_equals_reference():
    memory = unit_rows(100, 33)
    idx = torch.randint(0, 100, (5, 17))
    weights = torch.randn(5, 17)
    x = torch.randn(5, 33, requires_grad=True)
    (memory_scores(x, memory, idx, 0.1) * weights).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (reference.memory_scores(x_ref, memory, idx, 0.1) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradient_has_input_dtype():
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    memory_scores(x, unit_rows(20, 16), torch.randint(0, 20, (4, 3)), 0.07).sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_gradcheck_float64():
    memory = unit_rows(50, 12, torch.float64)
    idx = torch.randint(0, 50, (4, 9))
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: memory_scores(x, memory, idx, 0.3), (x,))


def test_opcheck():
    memory = unit_rows(40, 8)
    idx = torch.randint(0, 40, (3, 5))
    x = torch.randn(3, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.avidfast.memory_scores.default, (x, memory, idx, 0.07))
    torch.library.opcheck(
        torch.ops.avidfast.memory_scores_backward.default, (torch.randn(3, 5), memory, idx, 0.07)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(idx=torch.tensor([[0, 40]])), r"idx must lie in \[0, 40\)"),
        (dict(idx=torch.tensor([[-2, 1]])), "idx must lie in"),
        (dict(idx=torch.tensor([[0, 1]], dtype=torch.int32)), "idx must be int64"),
        (dict(idx=torch.tensor([0, 1])), "idx must be 2-D"),
        (dict(idx=torch.tensor([[0], [1]])), "idx has 2 rows"),
        (dict(x=torch.randn(1, 7)), "x has dim 7"),
        (dict(x=torch.randn(8)), "x must be a 2-D"),
        (dict(x=torch.ones(1, 8, dtype=torch.int64)), "x must be a floating"),
        (dict(memory=unit_rows(40, 8).t()), "memory must be contiguous"),
        (dict(memory=torch.randint(0, 3, (40, 8))), "memory must be float32"),
        (dict(memory=torch.randn(40)), "memory must be a 2-D"),
        (dict(temperature=0.0), "temperature must be a positive"),
        (dict(temperature=float("nan")), "temperature must be a positive"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    args = dict(x=torch.randn(1, 8), memory=unit_rows(40, 8), idx=torch.tensor([[0, 1]]), temperature=0.07)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        memory_scores(**args)


def test_second_derivative_equals_reference():
    # Scores are linear in x, so a second derivative flows through the backward pass alone
    # (memory_scores_backward, whose derivative is memory_scores): it used to be silently zero.
    memory = unit_rows(60, 12, torch.float64)
    idx = torch.randint(0, 60, (5, 9))
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: memory_scores(x, memory, idx, 0.3).square().sum(1), (x,))
    weights = torch.randn(5, 12, dtype=torch.float64)

    def hessian_vector(scores_fn, x):
        (grad,) = torch.autograd.grad(scores_fn(x, memory, idx, 0.3).sin().sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad((grad * weights).sum(), x)
        return hv

    ours = hessian_vector(memory_scores, x)
    ref = hessian_vector(reference.memory_scores, x.detach().clone().requires_grad_())
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_opcheck_of_the_backward_with_its_own_gradient():
    memory = unit_rows(40, 8)
    idx = torch.randint(0, 40, (3, 5))
    torch.library.opcheck(
        torch.ops.avidfast.memory_scores_backward.default,
        (torch.randn(3, 5, requires_grad=True), memory, idx, 0.07),
    )
