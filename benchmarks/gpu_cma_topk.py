"""GPU timing of cma_topk at the scale of AVID-CMA's memory banks.

Times avidfast's cma_topk (N = 1,784,108 items, D = 128, k = 32, consensus) with float32 banks
("highest": fp32 FMA; "high": TF32 tensor cores) and bfloat16 banks (bf16 tensor cores), against
the reference formulation that mines 16 queries per batch (sv = V[q:q+16] @ V.T, sa likewise,
min, mask self, topk), timed on a slice of queries and extrapolated to all N. Timing: CUDA events,
median of 3 runs after a warm-up; banks: random unit rows. Also checks ours against an exact
float32 top k for a few queries.

Run on a machine with a CUDA device (a script, nothing runs on import):

    python benchmarks/gpu_cma_topk.py [--items N] [--dim D] [--k K] [--configs highest,high,bf16]

Memory: the banks (fp32: N * D * 4 bytes each, 0.9 GB at the default size), the outputs (N * k *
12 bytes) and the reference's (16, N) matrices; well within an 80 GB card.
"""
import argparse
import statistics

import torch

DEFAULT_ITEMS = 1_784_108
CONFIGS = {
    # name: (bank dtype, precision)
    "highest": (torch.float32, "highest"),
    "high": (torch.float32, "high"),
    "bf16": (torch.bfloat16, "highest"),
}
TARGET_SECONDS = 10.0


def cuda_time(fn, repeats=3):
    """Median seconds of fn over `repeats` runs after one warm-up run, by CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def random_bank(num_items, dim, dtype, seed):
    """(num_items, dim) random unit rows on the GPU, built in chunks (no float32 copy for bf16)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    bank = torch.empty(num_items, dim, dtype=dtype, device="cuda")
    chunk = 1 << 18
    for start in range(0, num_items, chunk):
        rows = torch.randn(min(chunk, num_items - start), dim, device="cuda", generator=generator)
        bank[start:start + rows.shape[0]] = torch.nn.functional.normalize(rows, dim=1).to(dtype)
    return bank


def check(values, indices, video, audio, k, tol, reference):
    """Ours against the exact top k of 8 queries: values within tol, sets equal up to near-ties."""
    queries = torch.linspace(0, video.shape[0] - 1, 8).long().to(video.device)
    ref_values, ref_indices = reference.cma_topk(video, audio, k, "consensus", queries)  # float32 on the CPU
    ours_values, ours_indices = values[queries], indices[queries]
    value_error = (ours_values - ref_values).abs().max().item()
    kth = ref_values[:, -1:]
    # Items only in one list must agree to within 3 tol of the k-th value.
    mismatched = 0
    for q in range(len(queries)):
        ours, theirs = set(ours_indices[q].tolist()), set(ref_indices[q].tolist())
        for j, v in zip(ours_indices[q].tolist(), ours_values[q].tolist()):
            if j not in theirs and abs(v - kth[q].item()) > 3 * tol:
                mismatched += 1
    ok = value_error <= tol and mismatched == 0
    return ok, value_error


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--slice", type=int, default=4096, help="queries the reference is timed on")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_cma_topk.py needs a CUDA device")
    from avidfast.bench.baselines import sixteen_query_topk
    from avidfast.ops import cma_topk, has_cuda_kernels, reference

    if not has_cuda_kernels():
        raise SystemExit("avidfast._C has no CUDA kernels: rebuild with AVIDFAST_CUDA=1")

    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    n, d, k = args.items, args.dim, args.k
    slice_queries = min(args.slice, n)
    print(f"card: {card}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"cma_topk: N = {n:,}, D = {d}, k = {k}, consensus; reference timed on {slice_queries} "
          f"queries x{n / slice_queries:.1f}")

    rows = []
    for name in args.configs.split(","):
        dtype, precision = CONFIGS[name]
        video = random_bank(n, d, dtype, seed=1)
        audio = random_bank(n, d, dtype, seed=2)
        torch.set_float32_matmul_precision(precision)  # the reference's matmuls: fp32 or TF32
        out = {}

        def ours():
            out["result"] = cma_topk(video, audio, k, "consensus", precision=precision)

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ours_s = cuda_time(ours)
        peak_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
        tol = 1e-4 if name == "highest" else 1e-2
        ok, error = check(*out.pop("result"), video, audio, k, tol, reference)
        slice_rows = torch.arange(slice_queries, device=device)
        ref_slice_s = cuda_time(lambda: sixteen_query_topk(video, audio, k, "consensus", slice_rows))
        ref_s = ref_slice_s * n / slice_queries
        rows.append((name, str(dtype).replace("torch.", ""), precision, ours_s, ref_s, peak_gb, ok, error))
        print(f"  {name}: ours {ours_s:.2f} s, reference ~{ref_s:.1f} s, check {'ok' if ok else 'FAILED'}",
              flush=True)
        del video, audio
        torch.cuda.empty_cache()
    torch.set_float32_matmul_precision("highest")

    print()
    print(f"{card}: cma_topk N = {n:,}, D = {d}, k = {k}, consensus (median of 3 after a warm-up)")
    header = f"{'config':<8} {'banks':<9} {'precision':<9} {'ours (s)':>9} {'ref16 (s)':>10} {'speed-up':>9} {'extra GB':>9}  check"
    print(header)
    print("-" * len(header))
    for name, dtype, precision, ours_s, ref_s, peak_gb, ok, error in rows:
        print(f"{name:<8} {dtype:<9} {precision:<9} {ours_s:>9.2f} {ref_s:>10.1f} {ref_s / ours_s:>8.1f}x "
              f"{peak_gb:>9.2f}  {'ok' if ok else 'FAILED'} (max value error {error:.1e})")
    print(f"ref16: 16 queries per batch (matmul, min, mask, topk) timed on {slice_queries} queries, "
          f"extrapolated to {n:,}.")
    fast = [r for r in rows if r[0] in ("high", "bf16")]
    if fast:
        verdict = "met" if all(r[3] <= TARGET_SECONDS for r in fast) else "NOT met"
        print(f"target <= {TARGET_SECONDS:.0f} s for TF32 and bf16: {verdict}")


if __name__ == "__main__":
    main()
