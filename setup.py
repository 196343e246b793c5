"""Builds avidfast._C: the CPU kernels always, the CUDA kernels when CUDA is available or forced.

Environment:
  AVIDFAST_CUDA=1   build the CUDA kernels (error if impossible); defaults CUDA_HOME to
                    /usr/local/cuda when it exists, and TORCH_CUDA_ARCH_LIST to "8.0;9.0+PTX"
                    when no GPU is visible.
  AVIDFAST_CUDA=0   CPU kernels only.
  unset             CUDA kernels when torch is a CUDA build and a CUDA toolkit is found.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
except ImportError:
    sys.exit(
        "avidfast: PyTorch is not installed in this environment. Install it first "
        "(e.g. `pip install torch`), then build with `pip install --no-build-isolation .` "
        "so that the extension is compiled against that torch."
    )

# Ampere and Hopper machine code, plus Hopper PTX that newer GPUs (Blackwell) compile at load time.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
FORCE = os.environ.get("AVIDFAST_CUDA", "").strip()
if FORCE not in ("", "0", "1"):
    sys.exit(f"avidfast: AVIDFAST_CUDA must be 0, 1 or unset, not {FORCE!r}")
if FORCE == "1":
    if torch.version.cuda is None:
        sys.exit(
            f"avidfast: AVIDFAST_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
            "install a CUDA build of torch or unset AVIDFAST_CUDA."
        )
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

# cpp_extension reads CUDA_HOME when imported, so the environment above must be set first.
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _relative(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


if FORCE == "1":
    if CUDA_HOME is None:
        sys.exit("avidfast: AVIDFAST_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME.")
    with_cuda = True
elif FORCE == "0":
    with_cuda = False
else:
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None

sources = _relative("csrc/*.cpp") + _relative("csrc/ops/*.cpp") + _relative("csrc/ops/cpu/*.cpp")
# The sources are C++17 (torch 2.11 builds extensions as C++17; `make cmake-check` compiles them
# so). No -std flag here: BuildExtension adds the standard the installed torch's headers need
# (C++20 from torch 2.13). -g0 drops the -g that Python's flags add (an 11 MB library otherwise).
cxx_flags = ["-O3", "-fopenmp", "-g0"]
nvcc_flags = ["-O3"]
define_macros = []


def _cuda_archs() -> str:
    """The archs nvcc will build for: TORCH_CUDA_ARCH_LIST, else the visible GPUs' (as torch does)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join(f"{major}.{minor}" for major, minor in capabilities)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


if with_cuda:
    sources += _relative("csrc/ops/cuda/*.cu")
    # Recorded in the library for `avidfast info`; written with commas (shell-safe in build.ninja)
    # and turned into a string literal by the preprocessor (csrc/module.cpp). C++ only: nvcc
    # splits a -D value at commas (-DX=8.0,9.0+PTX would define a macro named "9.0+PTX").
    archs = ",".join(a for a in _cuda_archs().replace(" ", ";").split(";") if a)
    define_macros += [("AVIDFAST_WITH_CUDA", None)]
    cxx_flags += [f"-DAVIDFAST_CUDA_ARCH_TOKENS={archs}"]
    extension_type = CUDAExtension
    extra_compile_args = {"cxx": cxx_flags, "nvcc": nvcc_flags}
else:
    extension_type = CppExtension
    extra_compile_args = {"cxx": cxx_flags}

print(f"avidfast: building with torch {torch.__version__}, CUDA kernels: {'yes' if with_cuda else 'no'}")

setup(
    ext_modules=[
        extension_type(
            "avidfast._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
