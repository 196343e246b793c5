"""Plain-text tables and machine descriptions for benchmark results."""
import platform
from typing import List

import torch

from avidfast.bench.timing import Comparison


def describe_machine(device: str) -> str:
    """One line naming the processor (or GPU), thread count and torch version."""
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(torch.device(device))
    else:
        hardware = platform.processor() or "CPU"
        try:
            with open("/proc/cpuinfo") as f:
                hardware = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hardware += f", {torch.get_num_threads()} threads"
    return f"{hardware}; torch {torch.__version__}"


def format_table(results: List[Comparison], machine: str, scale: float = 1.0) -> str:
    """A table of median times, speed-ups and peak extra memory, one row per variant.

    scale: factor from the measured work to the whole job (e.g. N / Q when a slice of the
    queries was timed); when not 1, an extrapolated-time column is added.
    """
    header = ["case", "variant", "median ms", "speed-up of ours", "peak extra MB", "memory ratio"]
    if scale != 1.0:
        header.insert(3, "extrapolated s")
    rows = [header]
    for r in results:
        for variant, m in r.measurements.items():
            row = [r.name, variant, f"{m.median_ms:.3f}",
                   "-" if variant == "ours" else f"{r.speedup(variant):.2f}x",
                   f"{m.peak_extra_bytes / 2**20:.2f}",
                   "-" if variant == "ours" else f"{r.memory_ratio(variant):.4f}"]
            if scale != 1.0:
                row.insert(3, f"{m.median_ms * scale / 1e3:.1f}")
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"machine: {machine}"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.extend(f"{r.name}: {r.description}; median of {len(r.ours.times)} interleaved rounds" for r in results)
    lines.append("speed-up = variant median / ours; memory ratio = ours peak extra / variant peak extra")
    return "\n".join(lines)
