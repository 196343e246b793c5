"""cma_topk on CUDA against the CPU kernel and the reference, on fresh random banks.

float32 "highest" (fp32 FMA, the CPU kernel's dimension order) must give the CPU kernel's top k:
values within 1e-5, indices equal except where agreements tie within that. float32 "high" (TF32
tensor cores) and bfloat16 / float16 banks (tensor cores, fp32 accumulation) must give values
within 1e-2 and the same index sets except near the k-th value, judged by the true agreement of
every differing index recomputed in float64. Banks of small integers make every sum exact in
every precision: there the result must equal the reference exactly, ties included.

Skipped as a whole where no CUDA device is visible.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip(
        "no CUDA device visible: the CUDA kernel of cma_topk is tested on a machine with a GPU "
        "(build with AVIDFAST_CUDA=1)",
        allow_module_level=True,
    )

from avidfast.ops import cma_topk, has_cuda_kernels, reference  # noqa: E402
from conftest import unit_rows  # noqa: E402

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda")
MODES = ["consensus", "union", "video", "audio"]
EXACT_TOL = 1e-5     # float32 "highest" and float64 banks
REDUCED_TOL = 1e-2   # TF32, bfloat16, float16


def test_cuda_kernel_is_built():
    assert has_cuda_kernels(), "a CUDA device is visible but avidfast._C has no CUDA kernels"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("avidfast::cma_topk", "CUDA")


# ---------------------------------------------------------------------------------------------
# Helpers


def _query_rows(num_items, queries):
    return torch.arange(num_items) if queries is None else queries.cpu()


def _true_agreement(video, audio, rows, items, mode):
    """Agreement of (rows[q], items[q, j]) in float64, from the banks as given (on the CPU)."""
    v, a = video.cpu().double(), audio.cpu().double()
    items = items.cpu().clamp(min=0)
    sv = (v[rows][:, None, :] * v[items]).sum(-1)
    sa = (a[rows][:, None, :] * a[items]).sum(-1)
    return {"consensus": torch.minimum(sv, sa), "union": torch.maximum(sv, sa), "video": sv, "audio": sa}[mode]


def _assert_well_formed(values, indices, rows, k, num_items):
    """Shapes, dtypes, no self, no repeats, descending values, equal values by ascending index."""
    assert values.shape == indices.shape == (len(rows), k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.device.type == "cuda" and indices.device.type == "cuda"
    values, indices = values.cpu(), indices.cpu()
    assert ((indices >= 0) & (indices < num_items)).all(), "an index is out of range"
    assert torch.isfinite(values).all()
    assert not (indices == rows[:, None]).any(), "a query lists itself"
    if k > 1:
        assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "an item is listed twice"
        assert (values.diff(dim=1) <= 0).all(), "a row is not in descending order"
        equal = values[:, 1:] == values[:, :-1]
        assert (indices[:, 1:][equal] > indices[:, :-1][equal]).all(), "a tie is not by ascending index"


def _assert_close_to_cpu(video, audio, k, mode, queries, values, indices, tol, same_positions):
    """CUDA (values, indices) against the CPU kernel on the same banks.

    values: within tol of the CPU's, position by position (the r-th best of two approximations
    of the same agreements differ by at most their error), and within tol of the true agreement
    of the listed item. Indices: where they differ from the CPU's, the true agreements of the
    items involved lie within 3 tol of the CPU's value there (same_positions: a near-tie swap at
    that position) or of the CPU's k-th value (an exchange across the k-th place).
    """
    rows = _query_rows(video.shape[0], queries)
    _assert_well_formed(values, indices, rows, k, video.shape[0])
    cpu_queries = None if queries is None else queries.cpu()
    cpu_values, cpu_indices = cma_topk(video.cpu(), audio.cpu(), k, mode, cpu_queries)
    values, indices = values.cpu(), indices.cpu()
    torch.testing.assert_close(values, cpu_values, rtol=0, atol=tol)
    true_ours = _true_agreement(video, audio, rows, indices, mode)
    assert (values.double() - true_ours).abs().max() <= tol, "a value is not its item's agreement"
    margin = 3 * tol
    if same_positions:
        differ = indices != cpu_indices
        if differ.any():
            gap = (true_ours - cpu_values.double()).abs()[differ]
            assert gap.max() <= margin, f"an index differs beyond a near-tie (gap {gap.max():.3g})"
        return
    true_cpu = _true_agreement(video, audio, rows, cpu_indices, mode)
    kth = cpu_values[:, -1:].double()
    for q in range(len(rows)):
        ours, theirs = set(indices[q].tolist()), set(cpu_indices[q].tolist())
        if ours == theirs:
            continue
        only_ours = torch.tensor([j in ours - theirs for j in indices[q].tolist()])
        only_cpu = torch.tensor([j in theirs - ours for j in cpu_indices[q].tolist()])
        gaps = torch.cat([(true_ours[q][only_ours] - kth[q]).abs(), (true_cpu[q][only_cpu] - kth[q]).abs()])
        assert gaps.max() <= margin, (
            f"query {q}: the index sets differ beyond a near-tie at the k-th value (gap {gaps.max():.3g})"
        )


def _banks(num_items, dim, dtype):
    return unit_rows(num_items, dim, dtype).to(DEV), unit_rows(num_items, dim, dtype).to(DEV)


def _misaligned(bank):
    """The bank one element past an aligned address (the kernel's element-wise load path)."""
    flat = torch.empty(bank.numel() + 1, dtype=bank.dtype, device=bank.device)
    out = flat[1:].view(bank.shape)
    out.copy_(bank)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


SHAPES = [(1031, 64, 1), (2100, 128, 32), (1500, 128, 128), (777, 33, 7)]


# ---------------------------------------------------------------------------------------------
# Random banks against the CPU kernel


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_items, dim, k", SHAPES)
def test_float32_highest_matches_cpu(mode, num_items, dim, k):
    video, audio = _banks(num_items, dim, torch.float32)
    values, indices = cma_topk(video, audio, k, mode, precision="highest")
    _assert_close_to_cpu(video, audio, k, mode, None, values, indices, EXACT_TOL, same_positions=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_items, dim, k", SHAPES)
def test_float32_high_tf32_matches_cpu(mode, num_items, dim, k):
    video, audio = _banks(num_items, dim, torch.float32)
    values, indices = cma_topk(video, audio, k, mode, precision="high")
    _assert_close_to_cpu(video, audio, k, mode, None, values, indices, REDUCED_TOL, same_positions=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_items, dim, k", SHAPES)
def test_half_precision_banks_match_cpu(dtype, mode, num_items, dim, k):
    video, audio = _banks(num_items, dim, dtype)
    values, indices = cma_topk(video, audio, k, mode)
    _assert_close_to_cpu(video, audio, k, mode, None, values, indices, REDUCED_TOL, same_positions=False)


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_float64_banks(precision):
    video, audio = _banks(1300, 128, torch.float64)
    values, indices = cma_topk(video, audio, 32, "consensus", precision=precision)
    tol = EXACT_TOL if precision == "highest" else REDUCED_TOL
    _assert_close_to_cpu(video, audio, 32, "consensus", None, values, indices, tol,
                         same_positions=precision == "highest")


@pytest.mark.parametrize(
    "dtype, precision", [(torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest")]
)
def test_misaligned_banks_and_odd_dims(dtype, precision):
    for dim in (128, 37):
        video, audio = (_misaligned(bank) for bank in _banks(900, dim, dtype))
        values, indices = cma_topk(video, audio, 32, "consensus", precision=precision)
        exact = dtype == torch.float32 and precision == "highest"
        _assert_close_to_cpu(video, audio, 32, "consensus", None, values, indices,
                             EXACT_TOL if exact else REDUCED_TOL, same_positions=exact)


def test_large_dim():
    video, audio = _banks(700, 1000, torch.bfloat16)
    values, indices = cma_topk(video, audio, 16, "union")
    _assert_close_to_cpu(video, audio, 16, "union", None, values, indices, REDUCED_TOL, same_positions=False)


@pytest.mark.parametrize("k", [300, 1000])
def test_large_k(k):
    # 128 lists of k entries do not fit in shared memory: the lists live in global memory.
    video, audio = _banks(1400, 64, torch.float32)
    values, indices = cma_topk(video, audio, k, "consensus")
    _assert_close_to_cpu(video, audio, k, "consensus", None, values, indices, EXACT_TOL, same_positions=True)
    # Few queries: the items are split, and the splits' long lists merged.
    video, audio = _banks(9000, 64, torch.float32)
    queries = torch.tensor([0, 4321, 8999], device=DEV)
    values, indices = cma_topk(video, audio, k, "union", queries)
    _assert_close_to_cpu(video, audio, k, "union", queries, values, indices, EXACT_TOL, same_positions=True)


def test_largest_k():
    video, audio = _banks(300, 16, torch.float32)
    values, indices = cma_topk(video, audio, 298, "union")
    _assert_close_to_cpu(video, audio, 298, "union", None, values, indices, EXACT_TOL, same_positions=True)


# ---------------------------------------------------------------------------------------------
# Query subsets (few query blocks: the items are split across CTAs and the splits merged)


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_queries", [1, 5, 40, 300])
def test_query_subsets(precision, mode, num_queries):
    num_items, k = 5003, 32
    video, audio = _banks(num_items, 128, torch.float32)
    queries = torch.randint(0, num_items, (num_queries,))
    queries[0] = num_items - 1
    queries = queries.to(DEV)
    values, indices = cma_topk(video, audio, k, mode, queries, precision=precision)
    exact = precision == "highest"
    _assert_close_to_cpu(video, audio, k, mode, queries, values, indices,
                         EXACT_TOL if exact else REDUCED_TOL, same_positions=exact)
    if exact:
        # fp32 FMA in a fixed order: a query's row does not depend on the other queries.
        all_values, all_indices = cma_topk(video, audio, k, mode, precision=precision)
        assert torch.equal(values, all_values[queries]) and torch.equal(indices, all_indices[queries])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_queries(dtype):
    video, audio = _banks(2000, 64, dtype)
    queries = torch.tensor([7, 7, 1999, 0, 7, 1999, 0], device=DEV)
    values, indices = cma_topk(video, audio, 128, "consensus", queries)
    for a, b in [(0, 1), (0, 4), (2, 5), (3, 6)]:
        assert torch.equal(values[a], values[b]) and torch.equal(indices[a], indices[b])
    tol = EXACT_TOL if dtype == torch.float32 else REDUCED_TOL
    _assert_close_to_cpu(video, audio, 128, "consensus", queries, values, indices, tol,
                         same_positions=dtype == torch.float32)


def test_empty_queries():
    video, audio = _banks(100, 16, torch.float32)
    values, indices = cma_topk(video, audio, 5, "consensus", torch.empty(0, dtype=torch.long, device=DEV))
    assert values.shape == indices.shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# Exact banks: ties everywhere, every precision exact


def _integer_banks(num_items, dim, dtype, low=-2, high=3):
    video = torch.randint(low, high, (num_items, dim)).to(dtype)
    audio = torch.randint(low, high, (num_items, dim)).to(dtype)
    return video, audio


EXACT_CONFIGS = [
    (torch.float32, "highest"),
    (torch.float32, "high"),
    (torch.bfloat16, "highest"),
    (torch.float16, "highest"),
    (torch.float64, "highest"),
]


@pytest.mark.parametrize("dtype, precision", EXACT_CONFIGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 32, 128])
def test_ties_keep_the_lower_index(dtype, precision, mode, k):
    # Entries in {-2..2}: every product and sum is exact in bf16/fp16/tf32/fp32, so the kernel
    # sees the true agreements, with many ties, and must return exactly the reference's top k.
    video, audio = _integer_banks(1500, 24, dtype)
    # Identical rows 3, 700 and 1400: every query agrees equally with all three.
    for bank in (video, audio):
        bank[700] = bank[3]
        bank[1400] = bank[3]
    ref_values, ref_indices = reference.cma_topk(video, audio, k, mode)
    values, indices = cma_topk(video.to(DEV), audio.to(DEV), k, mode, precision=precision)
    assert torch.equal(indices.cpu(), ref_indices), "the top k or its tie order differs from the reference"
    assert torch.equal(values.cpu(), ref_values)
    queries = torch.tensor([3, 700, 1499, 0, 3, 1234])
    ref_values, ref_indices = reference.cma_topk(video, audio, k, mode, queries)
    values, indices = cma_topk(video.to(DEV), audio.to(DEV), k, mode, queries.to(DEV), precision=precision)
    assert torch.equal(indices.cpu(), ref_indices) and torch.equal(values.cpu(), ref_values)


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("mode", MODES)
def test_agreement_rising_with_the_index(precision, mode):
    # V[j] = (1, j): <V[q], V[j]> = 1 + q j rises with j, so later items keep displacing earlier
    # ones (every item is a candidate, buffers overflow, many merge rounds); A[j] = (1, N-1-j)
    # falls with j. Query 0 agrees equally (1) with every item of the video bank. Integers below
    # 2^11: exact in tf32, and every sum below 2^22: exact in fp32. Two zero columns make the
    # rows 16 bytes (the cp.async path).
    num_items = 2000
    j = torch.arange(num_items, dtype=torch.float32)
    ones, zeros = torch.ones(num_items), torch.zeros(num_items)
    video = torch.stack([ones, j, zeros, zeros], dim=1)
    audio = torch.stack([ones, num_items - 1 - j, zeros, zeros], dim=1)
    for k in (1, 32, 128):
        ref_values, ref_indices = reference.cma_topk(video, audio, k, mode)
        values, indices = cma_topk(video.to(DEV), audio.to(DEV), k, mode, precision=precision)
        assert torch.equal(indices.cpu(), ref_indices) and torch.equal(values.cpu(), ref_values)


# ---------------------------------------------------------------------------------------------
# Determinism, memory, schema


def test_deterministic():
    video, audio = _banks(3000, 128, torch.bfloat16)
    queries = torch.randint(0, 3000, (50,), device=DEV)
    for q in (None, queries):
        first = cma_topk(video, audio, 32, "consensus", q)
        for _ in range(2):
            again = cma_topk(video, audio, 32, "consensus", q)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype, precision", [(torch.float32, "high"), (torch.bfloat16, "highest")])
def test_never_allocates_queries_times_items(dtype, precision):
    num_items, k = 50_000, 32
    video, audio = _banks(num_items, 128, dtype)
    cma_topk(video, audio, k, queries=torch.arange(8, device=DEV), precision=precision)  # warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    values, indices = cma_topk(video, audio, k, precision=precision)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    full_matrix = num_items * num_items * 4
    assert extra < full_matrix / 50, f"peak extra memory {extra / 2**20:.0f} MiB"
    # The outputs and a few rows against the CPU kernel.
    queries = torch.arange(0, num_items, 997)
    _assert_close_to_cpu(video, audio, k, "consensus", queries.to(DEV), values[queries], indices[queries],
                         REDUCED_TOL, same_positions=False)


def test_opcheck():
    video, audio = _banks(300, 16, torch.float32)
    torch.library.opcheck(torch.ops.avidfast.cma_topk.default, (video, audio, 5, "consensus", None, "highest"))
    torch.library.opcheck(
        torch.ops.avidfast.cma_topk.default,
        (video, audio, 5, "union", torch.tensor([3, 9], device=DEV), "high"),
    )


# ---------------------------------------------------------------------------------------------
# AudioSet scale (issue 20)


def test_audioset_scale_bf16_few_queries():
    # N = 1,784,108 items (AudioSet), bf16 banks, k = 32, a few queries (the items split across
    # every SM, the splits merged): against the CPU kernel and the true agreements.
    num_items, dim, k = 1_784_108, 128, 32
    video, audio = (torch.nn.functional.normalize(torch.randn(num_items, dim, device=DEV), dim=1)
                    .to(torch.bfloat16) for _ in range(2))
    queries = torch.tensor([0, 1, 917_000, num_items - 1], device=DEV)
    for mode in ("consensus", "union"):
        values, indices = cma_topk(video, audio, k, mode, queries)
        _assert_close_to_cpu(video, audio, k, mode, queries, values, indices, REDUCED_TOL,
                             same_positions=False)
