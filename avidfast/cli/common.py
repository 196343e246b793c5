"""Shared pieces of the command line: the user-error type and argument types."""
import argparse
import math
from typing import Optional

import torch

from avidfast.errors import AvidfastError



class UserError(AvidfastError):
    """A mistake in the command line or its inputs: reported as one line, without a traceback."""


def check_device(device: str) -> None:
    """Refuses a CUDA device when none is visible."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible; use --device cpu")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """A float option that must be above 0 (argparse type)."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def frame_size(text: str):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT, e.g. 128x128, got {text}") from None
    return width, height


def read_manifest(path: str, root: Optional[str] = None):
    """Reads a manifest, turning a malformed one into a UserError."""
    from avidfast.data import manifest

    try:
        return manifest.read_manifest(path, root)
    except manifest.ManifestError as error:
        raise UserError(str(error)) from None
