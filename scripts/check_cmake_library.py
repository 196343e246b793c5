"""Loads the CMake-built operator library on its own and runs every CPU operator once.

Usage: python scripts/check_cmake_library.py BUILD_DIR
"""
import glob
import os
import sys

import torch


def main(build_dir: str) -> None:
    libraries = glob.glob(os.path.join(build_dir, "_C*.so"))
    if len(libraries) != 1:
        sys.exit(f"expected one _C*.so in {build_dir}, found {libraries}")
    torch.ops.load_library(libraries[0])
    ops = torch.ops.avidfast
    pos = torch.arange(8)
    memory = torch.nn.functional.normalize(torch.randn(100, 16), dim=1)
    x = torch.randn(8, 16)
    negatives = ops.sample_negatives(pos, 100, 12, 0, torch.tensor(0), 0, None)
    scores = ops.memory_scores(x, memory, negatives, 0.07)
    expected = torch.einsum("bd,bkd->bk", x, memory[negatives]) / 0.07
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    loss, grad = ops.nce_memory_loss(x, memory, pos[:, None], negatives, 0.07, torch.tensor(1.0))
    ops.memory_update_(memory, pos, x, 0.5)
    assert loss.shape == (8,) and grad.shape == (8, 16)
    print(f"cmake-check: {libraries[0]} loads and runs every operator")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".cmake-build")
