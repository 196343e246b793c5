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


def format_table(results: List[Comparison], machine: str) -> str:
    """A table of median times, speed-up and peak extra memory for each case."""
    header = ("case", "ours ms", "baseline ms", "speed-up", "ours peak MB", "baseline peak MB", "memory ratio")
    rows = [header]
    for r in results:
        rows.append((
            r.name,
            f"{r.ours.median_ms:.3f}",
            f"{r.baseline.median_ms:.3f}",
            f"{r.speedup:.2f}x",
            f"{r.ours.peak_extra_bytes / 2**20:.2f}",
            f"{r.baseline.peak_extra_bytes / 2**20:.2f}",
            f"{r.memory_ratio:.4f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"machine: {machine}"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.extend(f"{r.name}: {r.description}; median of {len(r.ours.times)} interleaved rounds" for r in results)
    lines.append("speed-up = baseline median / ours; memory ratio = ours peak extra / baseline peak extra")
    return "\n".join(lines)
