"""The argument checks of csrc/ops/checks.cpp that need no tensor values, for the fake kernels.

Each operator's fake kernel runs its check here before it builds its outputs, so that FakeTensor
tracing (torch.compile, torch.export, torch.library.opcheck) rejects what the CPU and CUDA
kernels reject: the same checks in the same order, each a ValueError (torch._check_value, the
TORCH_CHECK_VALUE of checks.cpp) with the kernels' message. Conditions on symbolic sizes become
guards or runtime asserts. What checks.cpp reads from tensor values (index ranges, the order of
`exclude`, step >= 0, Z > 0) needs data: the kernels check it when the traced program runs.
Keep this file and checks.cpp in step.
"""
import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(condition, message) -> None:
    """ValueError(message()) unless condition (a bool or a symbolic bool)."""
    torch._check_value(condition, message)


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def check_memory(memory: torch.Tensor) -> None:
    _check(memory.dim() == 2,
           lambda: f"memory must be a 2-D (num_items, dim) tensor, got shape {_shape(memory)}")
    _check(memory.dtype in FLOAT_DTYPES,
           lambda: f"memory must be float32, bfloat16, float16 or float64, got {memory.dtype}")
    _check(memory.is_contiguous(),
           lambda: "memory must be contiguous (call .contiguous() once when creating the bank)")
    for size in memory.shape:
        _check(size > 0, lambda: f"memory must have at least one row and one column, got shape "
                                 f"{_shape(memory)}")


def check_embeddings(x: torch.Tensor, name: str, memory: torch.Tensor) -> None:
    _check(x.dim() == 2, lambda: f"{name} must be a 2-D (batch, dim) tensor, got shape {_shape(x)}")
    _check(x.dtype in FLOAT_DTYPES,
           lambda: f"{name} must be a floating tensor (float32, float64, float16 or bfloat16), "
                   f"got {x.dtype}")
    _check(x.device == memory.device,
           lambda: f"{name} is on {x.device} but memory is on {memory.device}; move them to the "
                   "same device")
    _check(x.shape[1] == memory.shape[1],
           lambda: f"{name} has dim {x.shape[1]} but memory rows have dim {memory.shape[1]}")


def check_indices(idx: torch.Tensor, name: str, dims: int, rows, memory: torch.Tensor) -> None:
    """idx: int64, `dims`-D, `rows` rows, on memory's device (its values: in the kernels)."""
    _check(idx.dtype == torch.int64, lambda: f"{name} must be int64, got {idx.dtype}")
    _check(idx.dim() == dims, lambda: f"{name} must be {dims}-D, got shape {_shape(idx)}")
    _check(idx.shape[0] == rows,
           lambda: f"{name} has {idx.shape[0]} rows but the batch has {rows}")
    _check(idx.device == memory.device,
           lambda: f"{name} is on {idx.device} but memory is on {memory.device}; move them to "
                   "the same device")


def check_temperature(temperature: float) -> None:
    _check(math.isfinite(temperature) and temperature > 0,
           lambda: f"temperature must be a positive finite number, got {temperature}")


def check_sample_negatives(pos: torch.Tensor, num_items: int, num_negatives: int,
                           step: torch.Tensor, row_offset: int,
                           exclude: Optional[torch.Tensor]) -> None:
    _check(pos.dtype == torch.int64 and pos.dim() == 1,
           lambda: f"pos must be a 1-D int64 tensor of the rows' own indices, got {pos.dtype} of "
                   f"shape {_shape(pos)}")
    _check(num_items >= 2, lambda: f"num_items must be at least 2, got {num_items}")
    _check(num_negatives >= 1, lambda: f"num_negatives must be at least 1, got {num_negatives}")
    _check(row_offset >= 0, lambda: f"row_offset must be >= 0, got {row_offset}")
    _check(step.numel() == 1 and step.dtype == torch.int64,
           lambda: "step must be an int64 scalar (a Python int or a one-element int64 tensor)")
    _check(step.device.type == "cpu" or step.device == pos.device,
           lambda: f"step is on {step.device} but pos is on {pos.device}")
    excluded = 0
    if exclude is not None:
        _check(exclude.dtype == torch.int64 and exclude.dim() == 2,
               lambda: f"exclude must be a 2-D (batch, P) int64 tensor, got {exclude.dtype} of "
                       f"shape {_shape(exclude)}")
        _check(exclude.shape[0] == pos.shape[0],
               lambda: f"exclude has {exclude.shape[0]} rows but pos has {pos.shape[0]}")
        _check(exclude.device == pos.device,
               lambda: f"exclude is on {exclude.device} but pos is on {pos.device}")
        excluded = exclude.shape[1]
    _check(num_negatives < num_items - excluded - 1,
           lambda: f"num_negatives ({num_negatives}) must be smaller than num_items - P - 1 = "
                   f"{num_items - excluded - 1} (num_items {num_items}, P = {excluded} excluded "
                   "per row, and the row itself)")


def check_memory_scores(x: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor,
                        temperature: float) -> None:
    check_memory(memory)
    check_embeddings(x, "x", memory)
    check_indices(idx, "idx", 2, x.shape[0], memory)
    check_temperature(temperature)


def check_memory_scores_backward(grad_scores: torch.Tensor, memory: torch.Tensor,
                                 idx: torch.Tensor, temperature: float) -> None:
    check_memory(memory)
    _check(grad_scores.dim() == 2 and grad_scores.dtype in FLOAT_DTYPES,
           lambda: f"grad_scores must be a 2-D floating tensor, got {grad_scores.dtype} of shape "
                   f"{_shape(grad_scores)}")
    _check(grad_scores.device == memory.device,
           lambda: f"grad_scores is on {grad_scores.device} but memory is on {memory.device}")
    check_indices(idx, "idx", 2, grad_scores.shape[0], memory)
    _check(idx.shape[1] == grad_scores.shape[1],
           lambda: f"grad_scores has shape {_shape(grad_scores)} but idx has shape {_shape(idx)}")
    check_temperature(temperature)


def check_nce_memory_loss(x: torch.Tensor, memory: torch.Tensor, pos_idx: torch.Tensor,
                          neg_idx: torch.Tensor, temperature: float,
                          partition: torch.Tensor) -> None:
    check_memory(memory)
    check_embeddings(x, "x", memory)
    check_indices(pos_idx, "pos_idx", 2, x.shape[0], memory)
    check_indices(neg_idx, "neg_idx", 2, x.shape[0], memory)
    _check(pos_idx.shape[1] >= 1, lambda: "pos_idx must hold at least one positive per row")
    _check(neg_idx.shape[1] >= 1, lambda: "neg_idx must hold at least one negative per row")
    check_temperature(temperature)
    _check(partition.numel() == 1 and partition.dtype in FLOAT_DTYPES,
           lambda: "Z (the partition estimate) must be a float or a one-element floating tensor")
    _check(partition.device.type == "cpu" or partition.device == memory.device,
           lambda: f"Z is on {partition.device} but memory is on {memory.device}")


def check_memory_update(memory: torch.Tensor, idx: torch.Tensor, x: torch.Tensor,
                        momentum: float) -> None:
    check_memory(memory)
    check_embeddings(x, "x", memory)
    check_indices(idx, "idx", 1, x.shape[0], memory)
    _check(math.isfinite(momentum) and 0 <= momentum <= 1,
           lambda: f"momentum must lie in [0, 1], got {momentum}")


AGREEMENTS = ("consensus", "union", "video", "audio")


def check_cma_topk(video_memory: torch.Tensor, audio_memory: torch.Tensor, k: int, mode: str,
                   queries: Optional[torch.Tensor], precision: str) -> None:
    check_memory(video_memory)
    _check(audio_memory.shape == video_memory.shape,
           lambda: f"audio_memory has shape {_shape(audio_memory)} but video_memory has shape "
                   f"{_shape(video_memory)}")
    _check(audio_memory.dtype == video_memory.dtype,
           lambda: f"audio_memory is {audio_memory.dtype} but video_memory is {video_memory.dtype}")
    _check(audio_memory.device == video_memory.device,
           lambda: f"audio_memory is on {audio_memory.device} but video_memory is on "
                   f"{video_memory.device}")
    _check(audio_memory.is_contiguous(), lambda: "audio_memory must be contiguous")
    num_items = video_memory.shape[0]
    _check(k >= 1 and k < num_items - 1,
           lambda: f"k must lie in [1, num_items - 2] = [1, {num_items - 2}], got {k}")
    _check(mode in AGREEMENTS,
           lambda: f"mode must be 'consensus', 'union', 'video' or 'audio', got '{mode}'")
    _check(precision in ("highest", "high"),
           lambda: f"precision must be 'highest' or 'high', got '{precision}'")
    if queries is not None:
        _check(queries.dtype == torch.int64 and queries.dim() == 1,
               lambda: f"queries must be a 1-D int64 tensor of row indices, got {queries.dtype} "
                       f"of shape {_shape(queries)}")
        _check(queries.device == video_memory.device,
               lambda: f"queries is on {queries.device} but the banks are on {video_memory.device}")
