import numpy as np
import pytest
import torch

from avidfast.ops import reference, sample_negatives
from scipy import stats


def _sorted_exclusions(batch, count, num_items):
    return torch.sort(torch.randint(0, num_items, (batch, count)), dim=1).values


def test_reference_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for counter, key, expected in cases:
        out = reference.philox4x32_10(np.array([counter], np.uint64), np.array(key, np.uint64))
        assert out[0].tolist() == expected


@pytest.mark.parametrize("with_exclude", [False, True])
def test_equals_reference_exactly(with_exclude):
    num_items, batch, k = 97, 13, 41
    pos = torch.randint(0, num_items, (batch,))
    exclude = _sorted_exclusions(batch, 7, num_items) if with_exclude else None
    seed, step = int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**40, ()))
    ours = sample_negatives(pos, num_items, k, seed, step, exclude, row_offset=5)
    ref = reference.sample_negatives(pos, num_items, k, seed, step, exclude, row_offset=5)
    assert ours.dtype == torch.int64 and ours.shape == (batch, k)
    assert torch.equal(ours, ref)


def test_never_self_or_excluded():
    num_items, batch, k = 200, 64, 150
    pos = torch.randint(0, num_items, (batch,))
    exclude = _sorted_exclusions(batch, 32, num_items)
    out = sample_negatives(pos, num_items, k, 3, 11, exclude)
    assert out.min() >= 0 and out.max() < num_items
    assert not (out == pos[:, None]).any()
    assert not (out[:, :, None] == exclude[:, None, :]).any()


def test_uniform_over_complement_chi_square():
    num_items, k = 50, 40
    pos = torch.full((400,), 7, dtype=torch.int64)
    exclude = torch.tensor([[3, 3, 20, 49]]).repeat(400, 1)  # duplicate entries are allowed
    draws = torch.cat([sample_negatives(pos, num_items, k, 1234, step, exclude).flatten() for step in range(5)])
    counts = torch.bincount(draws, minlength=num_items).double()
    forbidden = torch.tensor([3, 7, 20, 49])
    assert counts[forbidden].sum() == 0
    allowed = torch.ones(num_items, dtype=torch.bool)
    allowed[forbidden] = False
    observed = counts[allowed].numpy()
    expected = np.full_like(observed, draws.numel() / allowed.sum().item())
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-4, f"draws are not uniform over the allowed set (p = {p_value:.2e})"


def test_same_seed_and_step_repeat_and_others_differ():
    pos = torch.randint(0, 10_000, (32,))
    base = sample_negatives(pos, 10_000, 64, 7, 3)
    assert torch.equal(base, sample_negatives(pos, 10_000, 64, 7, torch.tensor(3)))
    for seed, step in [(7, 4), (8, 3), (7, 3 + 2**32)]:
        other = sample_negatives(pos, 10_000, 64, seed, step)
        assert (other != base).float().mean() > 0.99


def test_row_offset_reproduces_rows_of_a_larger_batch():
    pos = torch.randint(0, 1000, (24,))
    whole = sample_negatives(pos, 1000, 16, 5, 9)
    parts = [sample_negatives(pos[i : i + 8], 1000, 16, 5, 9, row_offset=i) for i in (0, 8, 16)]
    assert torch.equal(torch.cat(parts), whole)


def test_opcheck():
    pos = torch.randint(0, 100, (6,))
    exclude = _sorted_exclusions(6, 3, 100)
    op = torch.ops.avidfast.sample_negatives.default
    torch.library.opcheck(op, (pos, 100, 8, 1, torch.tensor(2), 0, exclude))
    torch.library.opcheck(op, (pos, 100, 8, 1, torch.tensor(2), 0, None))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pos=torch.tensor([0, 100])), "pos must lie in"),
        (dict(pos=torch.tensor([-1, 2])), "pos must lie in"),
        (dict(pos=torch.tensor([0.0, 1.0])), "pos must be"),
        (dict(num_negatives=0), "num_negatives must be at least 1"),
        (dict(num_negatives=99), "num_negatives"),
        (dict(num_items=1), "num_items must be at least 2"),
        (dict(step=-1), "step must be >= 0"),
        (dict(exclude=torch.tensor([[5, 1], [1, 2]])), "sorted"),
        (dict(exclude=torch.tensor([[1, 200], [1, 2]])), "exclude must lie in"),
        (dict(exclude=torch.tensor([[1, 2]])), "exclude has 1 rows"),
        (dict(exclude=torch.tensor([[1, 2], [1, 2]]), num_negatives=97), r"num_items - P - 1"),
        (dict(row_offset=-3), "row_offset"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = dict(pos=torch.tensor([0, 1]), num_items=100, num_negatives=8, seed=0, step=0, exclude=None)
    args.update({k: v for k, v in kwargs.items() if k != "row_offset"})
    with pytest.raises(ValueError, match=message):
        sample_negatives(**args, row_offset=kwargs.get("row_offset", 0))
