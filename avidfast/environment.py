"""What this installation is and what it runs on: the first thing a bug report needs.

`describe()` returns plain data (for `avidfast info --json` and run folders); `format_report()`
turns it into the text that `avidfast info` prints. Nothing here needs the compiled extension:
when it cannot be loaded, the report says why.
"""
import importlib
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from avidfast import __version__

_THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """The vector-extension flags of /proc/cpuinfo that the kernels care about."""
    wanted = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx2", "fma")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in present]
    except OSError:
        pass
    return []


def huge_pages() -> str:
    """The transparent-huge-page mode ('always', 'madvise', 'never'), or why it is unknown."""
    try:
        with open(_THP_PATH) as f:
            text = f.read()
    except OSError:
        return "unavailable (no " + _THP_PATH + ")"
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else text.strip()


def _extension() -> Dict[str, Any]:
    from avidfast.ops import _extension

    info: Dict[str, Any] = {"loaded": _extension.available(), "error": _extension.LOAD_ERROR}
    if not _extension.available():
        return info
    from avidfast import _C

    info.update(
        built_against_torch=_C.torch_version,
        cuda_kernels=bool(_C.with_cuda) and _extension.has_cuda_kernels(),
        cuda_archs=_C.cuda_archs or None,
        openmp=bool(_C.with_openmp),
        cpu_kernels=_C.cpu_kernels(),
        file=_C.__file__,
    )
    return info


def _module_version(name: str) -> Tuple[Optional[str], Optional[str]]:
    """(version, None) when `name` imports, else (None, why not)."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # an optional package can fail in many ways; report, never crash
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()
    return getattr(module, "__version__", "unknown"), None


def _dali() -> Dict[str, Any]:
    version, error = _module_version("nvidia.dali")
    info: Dict[str, Any] = {"version": version, "error": error}
    if version is not None:
        try:
            from nvidia.dali import backend

            info["gpus_visible"] = int(backend.GetCUDADeviceCount())
        except Exception as error:  # DALI without a driver raises its own errors
            info["gpus_visible"] = 0
            info["gpu_error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
    return info


def _pyav() -> Dict[str, Any]:
    version, error = _module_version("av")
    info: Dict[str, Any] = {"version": version, "error": error}
    if version is not None:
        import av

        versions = getattr(av, "library_versions", {})
        if "libavcodec" in versions:
            info["libavcodec"] = ".".join(str(part) for part in versions["libavcodec"])
    return info


def _cuda() -> Dict[str, Any]:
    info: Dict[str, Any] = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if info["available"]:
        info["devices"] = [
            f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())
        ]
    return info


def _parallel_backend() -> str:
    """ATen's parallel backend as torch reports it (e.g. 'OpenMP')."""
    for line in torch.__config__.parallel_info().splitlines():
        if "parallel backend" in line:
            return line.split(":", 1)[1].strip()
    return "unknown"


def describe() -> Dict[str, Any]:
    """Every fact of `avidfast info` as plain data (JSON-serialisable)."""
    version, torchcodec_error = _module_version("torchcodec")
    return {
        "avidfast": __version__,
        "package": os.path.dirname(os.path.abspath(__file__)),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "extension": _extension(),
        "cuda": _cuda(),
        "cpu": {"model": cpu_model(), "flags": cpu_flags(), "logical_cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "torch_parallel_backend": _parallel_backend()},
        "huge_pages": huge_pages(),
        "pyav": _pyav(),
        "torchcodec": {"version": version, "error": torchcodec_error},
        "dali": _dali(),
    }


def _package_line(info: Dict[str, Any]) -> str:
    if info["version"] is None:
        return f"not importable ({info['error']})"
    return str(info["version"])


def format_report(facts: Dict[str, Any]) -> str:
    """The human-readable `avidfast info` text for `facts` (from describe())."""
    ext = facts["extension"]
    lines = [
        f"avidfast {facts['avidfast']} ({facts['package']})",
        f"python {facts['python']} on {facts['platform']}",
        f"torch running: {facts['torch']}",
    ]
    if ext["loaded"]:
        lines += [
            f"torch the extension was built against: {ext['built_against_torch']}",
            f"extension: {ext['file']}",
            "CUDA kernels: " + (f"yes, archs {ext['cuda_archs']}" if ext["cuda_kernels"] else "no (CPU-only build)"),
            f"CPU row loops: {ext['cpu_kernels']['row_loops']}; cma_topk tiles: {ext['cpu_kernels']['cma_tiles']}",
            "OpenMP: " + ("yes" if ext["openmp"] else "NO (at::parallel_for runs on one thread)"),
        ]
    else:
        lines.append(f"extension: NOT USABLE. {ext['error']}")
    cuda = facts["cuda"]
    lines.append(
        f"torch CUDA: {cuda['torch_cuda'] or 'none (CPU build)'}; GPUs visible: "
        + (", ".join(cuda["devices"]) if cuda["available"] else "none")
    )
    cpu = facts["cpu"]
    lines += [
        f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; flags: {' '.join(cpu['flags']) or 'none of avx2/avx512'}",
        f"threads: torch {cpu['torch_threads']} (ATen parallel backend: {cpu['torch_parallel_backend']})",
        f"transparent huge pages: {facts['huge_pages']}",
    ]
    pyav = facts["pyav"]
    pyav_line = _package_line(pyav)
    if pyav.get("libavcodec"):
        pyav_line += f" (libavcodec {pyav['libavcodec']})"
    lines.append(f"PyAV: {pyav_line}")
    lines.append(f"torchcodec: {_package_line(facts['torchcodec'])}")
    dali = facts["dali"]
    dali_line = _package_line(dali)
    if dali["version"] is not None:
        dali_line += f"; GPUs DALI sees: {dali.get('gpus_visible', 0)}"
    lines.append(f"DALI: {dali_line}")
    return "\n".join(lines)
