import pytest
import torch

from avidfast.ops import memory_update_, reference
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
