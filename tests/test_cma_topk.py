import os

import pytest
import torch

from avidfast.ops import cma_topk, reference, sorted_positives
from conftest import unit_rows

MODES = ["consensus", "union", "video", "audio"]


def _true_agreement(video, audio, rows, items, mode):
    """Agreement of (rows[q], items[q, j]) recomputed in float64."""
    v, a = video.double(), audio.double()
    sv = (v[rows][:, None, :] * v[items]).sum(-1)
    sa = (a[rows][:, None, :] * a[items]).sum(-1)
    return {"consensus": torch.minimum(sv, sa), "union": torch.maximum(sv, sa), "video": sv, "audio": sa}[mode]


def assert_same_topk(video, audio, k, mode, queries, values, indices, atol):
    """Ours equals the reference; an index may differ only where the agreements tie within atol."""
    ref_values, ref_indices = reference.cma_topk(video, audio, k, mode, queries)
    rows = torch.arange(video.shape[0]) if queries is None else queries
    assert values.shape == indices.shape == (len(rows), k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    torch.testing.assert_close(values, ref_values, rtol=0, atol=atol)
    differ = indices != ref_indices
    if differ.any():
        true = _true_agreement(video, audio, rows, indices, mode).float()
        assert (true[differ] - ref_values[differ]).abs().max() <= 2 * atol, "an index differs beyond a near-tie"
    assert not (indices == rows[:, None]).any(), "a query lists itself"
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "an item is listed twice"
    assert (values.diff(dim=1) <= 0).all(), "rows are not in descending order"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_items, dim, k", [(300, 33, 1), (1031, 128, 32), (2100, 40, 128), (777, 64, 7)])
def test_float32_equals_reference(mode, num_items, dim, k):
    video, audio = unit_rows(num_items, dim), unit_rows(num_items, dim)
    values, indices = cma_topk(video, audio, k, mode)
    assert_same_topk(video, audio, k, mode, None, values, indices, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_query_subsets(mode):
    video, audio = unit_rows(1500, 48), unit_rows(1500, 48)
    queries = torch.cat([torch.randperm(1500)[:37], torch.tensor([0, 1499, 0])])  # repeats allowed
    values, indices = cma_topk(video, audio, 20, mode, queries)
    assert_same_topk(video, audio, 20, mode, queries, values, indices, atol=1e-6)
    full_values, full_indices = cma_topk(video, audio, 20, mode)
    assert torch.equal(indices, full_indices[queries]) and torch.equal(values, full_values[queries])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_reduced_precision_banks(dtype):
    video, audio = unit_rows(1200, 128, dtype), unit_rows(1200, 128, dtype)
    values, indices = cma_topk(video, audio, 32, "consensus")
    # The reference sees the same rounded banks in float32: only summation order differs.
    assert_same_topk(video, audio, 32, "consensus", None, values, indices, atol=1e-5)


def test_ties_keep_the_lower_index():
    # Rows 3, 7 and 12 are identical, so every query agrees equally with all three; exact
    # small-integer values make every sum exact, whatever the summation order.
    base = torch.randint(-4, 5, (20, 8)).float()
    base[7] = base[3]
    base[12] = base[3]
    group = [3, 7, 12]
    values, indices = cma_topk(base, base.clone(), 18, "consensus")
    for q in range(20):
        if q in group:
            continue
        row = indices[q].tolist()
        present = [i for i in group if i in row]
        assert present == group[: len(present)], "a tie dropped a lower index before a higher one"
    # Small integers tie often beyond the group too: within equal agreements, indices ascend.
    equal = values[:, 1:] == values[:, :-1]
    assert equal.any() and (indices[:, 1:][equal] > indices[:, :-1][equal]).all()
    ref_values, ref_indices = reference.cma_topk(base, base.clone(), 18, "consensus")
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


def test_sorted_positives_for_exclusion():
    video, audio = unit_rows(400, 16), unit_rows(400, 16)
    _, indices = cma_topk(video, audio, 10)
    positives = sorted_positives(indices)
    assert (positives.diff(dim=1) > 0).all()
    assert torch.equal(positives.sort(dim=1).values, indices.sort(dim=1).values)


def _peak_rss_delta(fn) -> int:
    """Bytes by which fn raises this process's peak resident set (VmHWM reset before it)."""
    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    fn()
    return hwm() - rss


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_extra_memory_does_not_grow_with_queries_times_items():
    video, audio = unit_rows(12_000, 128), unit_rows(12_000, 128)
    cma_topk(video, audio, 32, queries=torch.arange(64))  # warm up allocator and threads
    delta = _peak_rss_delta(lambda: cma_topk(video, audio, 32))
    full_matrix = 12_000 * 12_000 * 4
    assert delta < full_matrix / 20, f"peak grew by {delta / 2**20:.0f} MiB"


def test_opcheck():
    video, audio = unit_rows(100, 16), unit_rows(100, 16)
    torch.library.opcheck(torch.ops.avidfast.cma_topk.default, (video, audio, 5, "consensus", None, "highest"))
    torch.library.opcheck(
        torch.ops.avidfast.cma_topk.default, (video, audio, 5, "union", torch.tensor([3, 9]), "high")
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=99), r"k must lie in \[1, num_items - 2\]"),
        (dict(k=0), "k must lie in"),
        (dict(mode="intersection"), "mode must be"),
        (dict(precision="medium"), "precision must be"),
        (dict(audio_memory=unit_rows(100, 8)), "audio_memory has shape"),
        (dict(audio_memory=unit_rows(100, 16, torch.bfloat16)), "audio_memory is"),
        (dict(queries=torch.tensor([0, 100])), r"queries must lie in \[0, 100\)"),
        (dict(queries=torch.tensor([[0, 1]])), "queries must be a 1-D int64"),
        (dict(video_memory=unit_rows(16, 100).t()), "memory must be contiguous"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    args = dict(video_memory=unit_rows(100, 16), audio_memory=unit_rows(100, 16), k=5, mode="consensus", queries=None)
    args.update({key: value for key, value in change.items() if key != "precision"})
    with pytest.raises(ValueError, match=message):
        cma_topk(**args, precision=change.get("precision", "highest"))
