"""GPU timing of the training loss step with the value checks on the device or on the host.

The operators check index ranges, Z, step and the order of `exclude` (csrc/ops/device_errors.h).
By default the CUDA kernels check them on the device and report lazily: no host sync. With
AVIDFAST_SYNC_CHECKS=1 they are checked on the host before each launch, at one device-to-host
read (a stream sync) each. This script times the Cross-AVID loss step (AVIDLoss forward +
backward + bank update: sample_negatives, 2 x nce_memory_loss, 2 x memory_update_) both ways in
one process (switched with avidfast._C._set_value_checks), interleaved, and prints the wall-clock
milliseconds per step (median of the rounds, each `--steps` steps then a synchronize) and the
host reads per step the checks made. A sync costs most when the host would otherwise run ahead
of the GPU, i.e. for small steps; the default sizes are those of `avidfast bench ops`.

Run on a machine with a CUDA device (a script, nothing runs on import):

    python benchmarks/gpu_value_checks.py [--items N] [--batch B] [--negatives K] [--dim D]
"""
import argparse
import statistics
import time

import torch

MODES = {"device (default)": 1, "host (AVIDFAST_SYNC_CHECKS=1)": 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_value_checks.py needs a CUDA device")
    from avidfast import _C
    from avidfast.losses import AVIDLoss
    from avidfast.ops import check_errors, has_cuda_kernels

    if not has_cuda_kernels():
        raise SystemExit("avidfast._C has no CUDA kernels: rebuild with AVIDFAST_CUDA=1")
    device = torch.device("cuda")
    loss_fn = AVIDLoss(args.items, args.dim, args.negatives, mode="cross").to(device)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        video = torch.randn(args.batch, args.dim, generator=generator).to(device).requires_grad_()
        audio = torch.randn(args.batch, args.dim, generator=generator).to(device).requires_grad_()
        index = torch.randperm(args.items, generator=generator)[: args.batch].to(device)
        batches.append((video, audio, index))

    def run(steps):
        for i in range(steps):
            video, audio, index = batches[i % len(batches)]
            loss, _ = loss_fn(video, audio, index)
            loss.backward()

    times = {name: [] for name in MODES}
    reads = {}
    try:
        for name, mode in MODES.items():  # warm-up, and the host reads of one step
            _C._set_value_checks(mode)
            run(3)
            torch.cuda.synchronize()
            before = _C._host_reads()
            run(1)
            torch.cuda.synchronize()
            reads[name] = _C._host_reads() - before
        for r in range(args.rounds):
            order = list(MODES.items()) if r % 2 == 0 else list(reversed(MODES.items()))
            for name, mode in order:
                _C._set_value_checks(mode)
                torch.cuda.synchronize()
                start = time.perf_counter()
                run(args.steps)
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / args.steps)
    finally:
        _C._set_value_checks(-1)
    check_errors()

    card = torch.cuda.get_device_name(device)
    print(f"{card}: Cross-AVID loss step (fwd + bwd + update), B = {args.batch}, K = {args.negatives}, "
          f"D = {args.dim}, N = {args.items:,}; median of {args.rounds} rounds of {args.steps} steps")
    header = f"{'value checks':<32} {'ms/step':>8} {'host reads/step':>16}"
    print(header)
    print("-" * len(header))
    for name in MODES:
        print(f"{name:<32} {statistics.median(times[name]) * 1e3:>8.3f} {reads[name]:>16d}")
    device_ms = statistics.median(times["device (default)"]) * 1e3
    host_ms = statistics.median(times["host (AVIDFAST_SYNC_CHECKS=1)"]) * 1e3
    print(f"synchronous checks cost {host_ms - device_ms:+.3f} ms per step ({host_ms / device_ms:.2f}x)")


if __name__ == "__main__":
    main()
