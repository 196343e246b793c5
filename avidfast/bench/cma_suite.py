"""The CMA mining benchmark: cma_topk against the reference's 16-query method and a bare
matrix-product pass, on the same banks and queries in one run."""
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from avidfast.bench.baselines import bare_similarity_pass, sixteen_query_topk
from avidfast.bench.suite import Case
from avidfast.ops import cma_topk


@dataclass
class CMABenchConfig:
    """Sizes of the mining benchmark (defaults: the issue's N=50,000, D=128, k=32, consensus).

    All three variants scale linearly with the number of queries, so each round mines a slice of
    `queries` rows (0: all N) and the table also gives the time extrapolated to all N queries.
    """

    num_items: int = 50_000
    dim: int = 128
    k: int = 32
    mode: str = "consensus"
    queries: int = 4096
    device: str = "cpu"
    rounds: int = 3
    warmup: int = 1
    seed: int = 0


def _banks(cfg: CMABenchConfig, device: torch.device):
    g = torch.Generator().manual_seed(cfg.seed)
    video = F.normalize(torch.randn(cfg.num_items, cfg.dim, generator=g), dim=1).to(device)
    audio = F.normalize(torch.randn(cfg.num_items, cfg.dim, generator=g), dim=1).to(device)
    count = cfg.queries if 0 < cfg.queries < cfg.num_items else cfg.num_items
    queries = torch.randperm(cfg.num_items, generator=g)[:count].sort().values.to(device)
    return video, audio, queries


def _mining_case(cfg: CMABenchConfig, device: torch.device, bank_dtype: torch.dtype) -> Case:
    video, audio, queries = _banks(cfg, device)
    ours_video, ours_audio = video.to(bank_dtype), audio.to(bank_dtype)
    name = str(bank_dtype).replace("torch.", "")
    return Case(
        f"cma_mining_{name}",
        f"positive mining, Q={queries.numel()} of N={cfg.num_items} queries, D={cfg.dim}, k={cfg.k}, "
        f"{cfg.mode}; ours on {name} banks, baselines on float32 banks",
        {
            "ours": lambda: cma_topk(ours_video, ours_audio, cfg.k, cfg.mode, queries),
            "sixteen_query": lambda: sixteen_query_topk(video, audio, cfg.k, cfg.mode, queries),
            "bare_matmul": lambda: bare_similarity_pass(video, audio, queries),
        },
        memory="resident",
    )


CASES: Dict[str, Callable[[CMABenchConfig, torch.device], Case]] = {
    "cma_mining_float32": lambda cfg, device: _mining_case(cfg, device, torch.float32),
    "cma_mining_bfloat16": lambda cfg, device: _mining_case(cfg, device, torch.bfloat16),
}
