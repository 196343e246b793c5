"""Conversions from the Python faces' friendly arguments to the operators' tensor arguments."""
from typing import Union

import torch


def scalar_tensor(value: Union[int, float, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for `value`; tensors are passed through (no copy, no device move)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=dtype)
