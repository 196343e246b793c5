"""Loads the compiled operator library avidfast._C (which registers torch.ops.avidfast.*)."""
import torch

try:
    from avidfast import _C  # noqa: F401  (importing registers the operators)
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "avidfast's compiled operators (avidfast._C) are not importable. Build them with "
        "`pip install --no-build-isolation .` from the source tree (torch must already be "
        "installed), and run Python from outside the source tree or after an editable install "
        f"(`pip install --no-build-isolation -e .`). Original error: {error}"
    ) from error

OPS = torch.ops.avidfast


def has_cuda_kernels() -> bool:
    """True when this build of avidfast._C carries the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("avidfast::nce_memory_loss", "CUDA")
