"""Loads the compiled operator library avidfast._C (which registers torch.ops.avidfast.*).

`import avidfast.ops` never fails because of the extension: when avidfast._C is missing, cannot
be loaded, or was built against another torch, the Python faces still import (and so do the
plain-PyTorch references in avidfast.ops.reference), and the first use of an operator raises
one ExtensionUnavailableError that says what is wrong and which command fixes it.
"""
from typing import Callable, Optional

import torch

from avidfast.errors import ExtensionUnavailableError


REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps avidfast"
_REBUILD_ADVICE = (
    "Rebuild it against the torch you run: with torch installed first, run "
    f"`{REBUILD_COMMAND}` (or `pip install --no-build-isolation .` in the source tree); "
    "`avidfast info` shows both torch versions."
)


def _base_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0'."""
    return version.split("+", 1)[0]


def _load() -> Optional[str]:
    """Imports avidfast._C; returns None on success, else why it cannot be used."""
    try:
        from avidfast import _C
    except ImportError as error:
        text = str(error)
        if "undefined symbol" in text or "symbol not found" in text.lower():
            return (
                "avidfast's compiled operators (avidfast._C) were built against another version "
                f"of torch than the one running ({torch.__version__}): {text.splitlines()[0]}. "
                + _REBUILD_ADVICE
            )
        if "No module named" in text or "cannot import name" in text:
            return (
                "avidfast's compiled operators (avidfast._C) are not installed with this copy of "
                "avidfast (a source tree on sys.path without a build, or an incomplete install). "
                "Install avidfast with `pip install --no-build-isolation .` from the source tree "
                "(torch first), and run Python from outside the source tree, or use an editable "
                "install (`pip install --no-build-isolation -e .`)."
            )
        return f"avidfast's compiled operators (avidfast._C) failed to load: {text}. " + _REBUILD_ADVICE
    except OSError as error:
        return f"avidfast's compiled operators (avidfast._C) failed to load: {error}. " + _REBUILD_ADVICE
    built = getattr(_C, "torch_version", None)
    if built is not None and _base_version(built) != _base_version(torch.__version__):
        return (
            f"avidfast's compiled operators were built against torch {built}, but torch "
            f"{torch.__version__} is running. " + _REBUILD_ADVICE
        )
    return None


LOAD_ERROR: Optional[str] = _load()


def available() -> bool:
    """True when avidfast._C is loaded and matches the running torch."""
    return LOAD_ERROR is None


def require() -> None:
    """Raises ExtensionUnavailableError (with the fix) unless the operators can be used."""
    if LOAD_ERROR is not None:
        raise ExtensionUnavailableError(LOAD_ERROR)


class _UnavailableOps:
    """Stands in for torch.ops.avidfast when the extension cannot be used."""

    def __getattr__(self, name: str):
        raise ExtensionUnavailableError(LOAD_ERROR)


OPS = torch.ops.avidfast if LOAD_ERROR is None else _UnavailableOps()


def register_fake(name: str) -> Callable:
    """torch.library.register_fake for an avidfast operator; a no-op without the extension."""
    if LOAD_ERROR is None:
        return torch.library.register_fake(name)
    return lambda function: function


def register_autograd(name: str, backward: Callable, *, setup_context: Callable) -> None:
    """torch.library.register_autograd for an avidfast operator; a no-op without the extension."""
    if LOAD_ERROR is None:
        torch.library.register_autograd(name, backward, setup_context=setup_context)


def has_cuda_kernels() -> bool:
    """True when this build of avidfast._C carries the CUDA kernels."""
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "avidfast::nce_memory_loss", "CUDA"
    )
