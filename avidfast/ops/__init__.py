"""Fused memory-bank operators (C++ CPU kernels, CUDA kernels when built).

Each operator has a plain-PyTorch reference in avidfast.ops.reference that defines what it
computes; the tests compare the two on random inputs.
"""
from avidfast.ops._extension import has_cuda_kernels
from avidfast.ops.cma import cma_topk, sorted_positives
from avidfast.ops.device_checks import check_errors
from avidfast.ops.nce import estimate_partition, nce_memory_loss
from avidfast.ops.sampling import sample_negatives
from avidfast.ops.scores import memory_scores
from avidfast.ops.update import memory_update_

__all__ = [
    "check_errors",
    "cma_topk",
    "estimate_partition",
    "has_cuda_kernels",
    "memory_scores",
    "memory_update_",
    "nce_memory_loss",
    "sample_negatives",
    "sorted_positives",
]
