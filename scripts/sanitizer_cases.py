#!/usr/bin/env python3
"""Small cases of every CUDA kernel of avidfast, for a pass under compute-sanitizer.

`make gpu-check` (scripts/gpu_check.py, step `sanitizer`) runs this script once under each of
compute-sanitizer's memcheck, racecheck, synccheck and initcheck tools, with PyTorch's caching
allocator off (so that an access past a tensor is past an allocation). Every path of the launch
plans is taken once, on sizes small enough for racecheck: the rows kernel's vector widths 1-8, its
scalar fallback (odd D, misaligned bank) and global fallback (large D), several splits and one,
memory_update_'s scan (several tiles), sort and workspace paths, sample_negatives with and without
`exclude`, cma_topk's tensor-core and FMA paths with lists on chip and in global memory, and the
device-side value checks (a bad index recorded on the device, then reported). Prints "ok" at the
end; any failure raises.
"""
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitizer_cases: no CUDA device", file=sys.stderr)
        return 2
    from avidfast import _C
    from avidfast.ops import (check_errors, cma_topk, has_cuda_kernels, memory_scores, memory_update_,
                              nce_memory_loss, sample_negatives)

    assert has_cuda_kernels(), "avidfast._C has no CUDA kernels"
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)

    def rows(n, d, dtype=torch.float32):
        return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).to(dev)

    # sample_negatives: without and with exclude, host and device step.
    pos = torch.randint(0, 500, (33,), generator=g).to(dev)
    exclude = torch.sort(torch.randint(0, 500, (33, 5), generator=g), dim=1).values.to(dev)
    sample_negatives(pos, 500, 64, 1, 3)
    neg = sample_negatives(pos, 500, 64, 1, torch.tensor(3, device=dev), exclude)

    # The rows kernel: memory_scores forward / backward and nce_memory_loss.
    for dtype, dims in ((torch.float32, (128, 256, 512, 1024, 33)), (torch.bfloat16, (256, 2048)),
                        (torch.float64, (64, 3072))):
        for dim in dims:
            memory = rows(500, dim, dtype)
            for x_dtype in {torch.float32, dtype}:
                x = rows(33, dim, x_dtype).requires_grad_()
                memory_scores(x, memory, neg, 0.1).sum().backward()
                nce_memory_loss(x, memory, pos, neg, 0.1, torch.tensor(1.5, device=dev)).backward()
    flat = torch.zeros(500 * 128 + 1, device=dev)
    misaligned = flat[1:].view(500, 128)
    misaligned.copy_(rows(500, 128))
    x = rows(4, 128).requires_grad_()
    nce_memory_loss(x, misaligned, pos[:4], neg[:4], 0.1, 1.5).backward()
    big = rows(40, 13000)
    x = rows(3, 13000).requires_grad_()
    small_idx = torch.randint(0, 40, (3, 50), generator=g).to(dev)
    memory_scores(x, big, small_idx, 0.1).sum().backward()
    nce_memory_loss(x, big, small_idx[:, :1], small_idx, 0.1, 1.5).backward()
    memory = rows(5000, 128)
    nce_memory_loss(rows(2, 128), memory, torch.randint(0, 5000, (2, 3), generator=g).to(dev),
                    torch.randint(0, 5000, (2, 4000), generator=g).to(dev), 0.1, 1.0)  # many splits

    # memory_update_: scan over several tiles, sort path, row in a global workspace.
    for batch, dim in ((1100, 128), (4097, 16), (6, 13000), (40, 33)):
        bank = rows(3000 if batch > 100 else 50, dim)
        idx = torch.randint(0, 3000 if batch > 100 else 5, (batch,), generator=g).to(dev)
        memory_update_(bank, idx, torch.randn(batch, dim, device=dev), 0.5)
    memory_update_(rows(100, 64, torch.float64), torch.tensor([3, 3, 7], device=dev),
                   torch.randn(3, 64, device=dev), 0.5)

    # cma_topk: bf16 tensor cores and fp32 FMA, lists on chip and (k = 300) in global memory,
    # few queries (split items).
    for dtype, precision, k in ((torch.bfloat16, "highest", 32), (torch.float32, "highest", 16),
                                (torch.float32, "high", 300)):
        video, audio = rows(1000, 64, dtype), rows(1000, 64, dtype)
        cma_topk(video, audio, k, "consensus", precision=precision)
        cma_topk(video, audio, k, "union", torch.tensor([0, 999, 5], device=dev), precision=precision)

    # The device-side value checks: a bad index is recorded, then reported.
    _C._set_value_checks(1)
    try:
        memory = rows(20, 16)
        loss = nce_memory_loss(rows(2, 16), memory, torch.tensor([[0], [1]], device=dev),
                               torch.tensor([[3, 20], [1, 2]], device=dev), 0.1, 1.0, reduction="none")
        assert bool(torch.isnan(loss[0])) and not bool(torch.isnan(loss[1]))
        try:
            check_errors()
        except ValueError as error:
            assert "neg_idx" in str(error), error
        else:
            raise AssertionError("the bad index was not reported")
    finally:
        _C._set_value_checks(-1)
    torch.cuda.synchronize()
    check_errors()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
