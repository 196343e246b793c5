"""The reference implementation's formulation of the memory-bank loss, as benchmark baselines.

This is how the original AVID-CMA code computes a step, rewritten here in plain PyTorch: an
alias-method sampler draws K + 1 indices per row (column 0 is then overwritten with the
positive), index_select gathers every drawn memory row into a (B, K + 1, D) tensor, bmm scores
them, and an unfused NCE criterion turns the scores into a loss; the bank update is
index_select / mul / add / normalize / index_copy_. It computes the same loss as
avidfast.losses.AVIDLoss (tests/test_bench.py checks this on shared negatives).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


class AliasSampler:
    """Walker's alias method over N outcomes with the given (unnormalised) weights.

    Drawing costs two table lookups and one Bernoulli per sample; tables live on `device`.
    """

    def __init__(self, weights: torch.Tensor):
        n = weights.numel()
        scaled = (weights.double() / weights.double().sum() * n).tolist()
        prob = [0.0] * n
        alias = [0] * n
        small = [i for i, w in enumerate(scaled) if w < 1.0]
        large = [i for i, w in enumerate(scaled) if w >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s], alias[s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        for i in small + large:
            prob[i] = 1.0
        self.prob = torch.tensor(prob, dtype=torch.float32, device=weights.device)
        self.alias = torch.tensor(alias, dtype=torch.int64, device=weights.device)

    def draw(self, count: int) -> torch.Tensor:
        """(count,) int64 samples."""
        column = torch.randint(0, self.prob.numel(), (count,), device=self.prob.device)
        keep = torch.bernoulli(self.prob.index_select(0, column)).long()
        return column * keep + self.alias.index_select(0, column) * (1 - keep)


class GatherCrossAVID:
    """Cross-AVID step of the reference formulation: gather, bmm, unfused NCE, index_copy_ update.

    Args: the two (N, D) banks (updated in place), K, T and the momentum m, as in AVIDLoss.
    """

    def __init__(self, video_memory: torch.Tensor, audio_memory: torch.Tensor, num_negatives: int,
                 temperature: float = 0.07, momentum: float = 0.5):
        self.video_memory, self.audio_memory = video_memory, audio_memory
        self.sampler = AliasSampler(torch.ones(video_memory.shape[0], device=video_memory.device))
        self.num_negatives = num_negatives
        self.temperature, self.momentum = temperature, momentum
        self.Z: Optional[torch.Tensor] = None  # one partition constant for both directions, as the reference

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K + 1) indices: column 0 the positive, then K alias-method draws."""
        idx = self.sampler.draw(index.numel() * (self.num_negatives + 1)).view(index.numel(), -1)
        idx[:, 0] = index
        return idx

    def _scores(self, x: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        batch, count = idx.shape
        weights = torch.index_select(memory, 0, idx.view(-1)).view(batch, count, -1)
        return torch.bmm(weights.to(x.dtype), x.unsqueeze(2)).squeeze(2) / self.temperature

    def _nce(self, scores: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # The reference's criterion: P(data | s) = e^s / (e^s + K Z) per column.
        e = torch.exp(scores)
        kz = self.num_negatives * z
        log_pos = torch.log(e[:, 0] / (e[:, 0] + kz))
        log_neg = torch.log(kz / (e[:, 1:] + kz)).sum(dim=1)
        return -(log_pos + log_neg).mean()

    def loss(self, video_emb: torch.Tensor, audio_emb: torch.Tensor, index: torch.Tensor,
             idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss of one batch on given (B, K + 1) indices; returns (loss, v, a) with v, a normalised."""
        v, a = F.normalize(video_emb, dim=1), F.normalize(audio_emb, dim=1)
        v2a = self._scores(v, self.audio_memory, idx)
        a2v = self._scores(a, self.video_memory, idx)
        if self.Z is None:  # estimated from the first direction's negatives
            self.Z = v2a[:, 1:].detach().exp().mean()
        return 0.5 * (self._nce(v2a, self.Z) + self._nce(a2v, self.Z)), v, a

    @torch.no_grad()
    def update(self, index: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> None:
        """The reference's bank update for both banks."""
        gather_memory_update_(self.video_memory, index, v, self.momentum)
        gather_memory_update_(self.audio_memory, index, a, self.momentum)

    def step(self, video_emb: torch.Tensor, audio_emb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Sample, loss, backward, update: what one training step asks of the loss."""
        loss, v, a = self.loss(video_emb, audio_emb, index, self.sample(index))
        loss.backward()
        self.update(index, v.detach(), a.detach())
        return loss.detach()


@torch.no_grad()
def gather_memory_update_(memory: torch.Tensor, index: torch.Tensor, x: torch.Tensor, momentum: float) -> None:
    """The reference's update of one bank: index_select, mul, add, normalize, index_copy_."""
    rows = torch.index_select(memory, 0, index)
    rows.mul_(momentum)
    rows.add_(torch.mul(x, 1 - momentum))
    memory.index_copy_(0, index, F.normalize(rows, dim=1).to(memory.dtype))


def _agreement(sv: torch.Tensor, sa: torch.Tensor, mode: str) -> torch.Tensor:
    return {"consensus": torch.minimum, "union": torch.maximum}[mode](sv, sa) if mode in ("consensus", "union") \
        else (sv if mode == "video" else sa)


@torch.no_grad()
def sixteen_query_topk(video: torch.Tensor, audio: torch.Tensor, k: int, mode: str,
                       queries: torch.Tensor, block: int = 16) -> torch.Tensor:
    """The reference's positive mining: `block` queries at a time, both banks' (block, N)
    similarities by matrix product, agreement, self masked, topk. Returns (Q, k) indices."""
    out = []
    for first in range(0, queries.numel(), block):
        rows = queries[first:first + block]
        agree = _agreement(video[rows] @ video.T, audio[rows] @ audio.T, mode)
        agree[torch.arange(rows.numel(), device=rows.device), rows] = -float("inf")
        out.append(agree.topk(k, dim=1).indices)
    return torch.cat(out)


@torch.no_grad()
def bare_similarity_pass(video: torch.Tensor, audio: torch.Tensor, queries: torch.Tensor,
                         block: int = 1024) -> None:
    """Only the matrix products of mining: both banks' similarities of every query with every
    item, `block` query rows at a time, results discarded. The floor a fused miner is held to."""
    for first in range(0, queries.numel(), block):
        rows = queries[first:first + block]
        video[rows] @ video.T
        audio[rows] @ audio.T
