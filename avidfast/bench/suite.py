"""Benchmark cases (ours and baselines doing the same work) and running a suite of them."""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from avidfast.bench.timing import Comparison, compare


@dataclass
class Case:
    """Callables doing the same work: "ours" and one per baseline."""

    name: str
    description: str
    variants: Dict[str, Callable[[], None]]
    rounds_scale: int = 1  # short cases get proportionally more rounds
    memory: str = "allocator"  # how peak extra memory is measured (see timing.compare)


def run_suite(builders: Dict[str, Callable[[object, torch.device], Case]], cfg, names: Optional[List[str]] = None,
              progress: Callable[[str], None] = lambda message: None) -> List[Comparison]:
    """Builds and measures the named cases (all by default); cfg needs device, rounds, warmup."""
    device = torch.device(cfg.device)
    results = []
    for name in names or list(builders):
        if name not in builders:
            raise ValueError(f"unknown benchmark case {name!r}; choose from {sorted(builders)}")
        progress(f"measuring {name} ...")
        case = builders[name](cfg, device)
        result = compare(case.name, case.description, case.variants, cfg.rounds * case.rounds_scale,
                         cfg.warmup, device, case.memory)
        results.append(result)
        progress("  " + ", ".join(f"{result.speedup(b):.2f}x faster than {b}" for b in result.baselines))
    return results
