"""Other codebases' memory-bank instance discrimination, written from their published equations.

Plain-PyTorch formulations of what each peer computes, for the migration guide's tests
(tests/test_migration.py runs docs/migration.md's snippets against them) and for the migration
benchmark (avidfast/bench/migration_suite.py). They are re-derived from the papers and the
equations the peers document, in the peers' own shape (an (B, K + 1, D) gather of the drawn rows,
bmm, an unfused criterion, autograd, an index_select / mix / normalize / index_copy_ update), not
copied from their code. Every class normalises its input embeddings, as the peers' networks do
in their last layer. Column 0 of the (B, K + 1) drawn indices is the positive (the row's own
slot); the peers draw the K others uniformly with replacement (an alias table), so they may
draw the positive itself; the tests hand them avidfast's draws instead.

* lemniscate (Wu et al., CVPR 2018; zhirongw/lemniscate.pytorch): NCEAverage scores
  P_j = exp(<x, M[j]> / T) / Z_peer, with Z_peer = N x mean(P) over the first batch's K + 1
  columns, frozen; NCECriterion: -[log(P_0 / (P_0 + K/N + eps)) + sum_k log((K/N) / (P_k + K/N +
  eps))], summed over the batch and divided by B (eps = 1e-7). LinearAverage + CrossEntropyLoss:
  the non-parametric softmax over all N rows. Update: M[y] <- normalize(m M[y] + (1 - m) x), one
  index_copy_ (the last of repeated indices wins on a CPU).
* VISSL NCELossWithMemory (PIRL, NPID++): lemniscate's equations with eps = float32 epsilon and
  Z_peer from the mean over every rank; loss_type "cross_entropy" is the sampled softmax
  (InfoNCE) over the K + 1 scores / T.
* CMC (Tian et al., ECCV 2020; HobbitLong/CMC) NCEAverage for two views l, ab: l is scored
  against memory_ab and ab against memory_l, each with its own Z_peer; the loss is the *sum* of
  the two NCE criteria; memory_l is updated with l and memory_ab with ab.
* mmselfsup NPID (SimpleMemory + ContrastiveHead + CrossEntropyLoss): the sampled softmax over
  [<x, M[y]>, <x, M[n_k]>] / T with target 0; SimpleMemory updates
  M[y] <- normalize((1 - m') M[y] + m' normalize(x)): m' weights the *new* feature
  (avidfast's momentum m = 1 - m').
"""
from typing import Optional

import torch
import torch.nn.functional as F

from avidfast.bench.baselines import AliasSampler

LEMNISCATE_EPS = 1e-7
VISSL_EPS = float(torch.finfo(torch.float32).eps)


def gather_scores(x: torch.Tensor, memory: torch.Tensor, columns: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K + 1) <x_b, M[columns[b, j]]> / T through a (B, K + 1, D) gather and bmm."""
    batch, count = columns.shape
    rows = torch.index_select(memory, 0, columns.reshape(-1)).view(batch, count, -1).to(x.dtype)
    return torch.bmm(rows, x.unsqueeze(2)).squeeze(2) / temperature


def nce_criterion(p: torch.Tensor, num_items: int, eps: float) -> torch.Tensor:
    """lemniscate's NCECriterion on P = exp(s) / Z_peer, column 0 the positive: mean over the batch."""
    k = p.shape[1] - 1
    noise = k / num_items
    log_data = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_noise = torch.log(noise / (p[:, 1:] + noise + eps))
    return -(log_data.sum() + log_noise.sum()) / p.shape[0]


@torch.no_grad()
def index_copy_update_(memory: torch.Tensor, index: torch.Tensor, x: torch.Tensor, old_weight: float) -> None:
    """M[y] <- normalize(old_weight * M[y] + (1 - old_weight) * x), one index_copy_ (lemniscate,
    CMC, VISSL; mmselfsup's SimpleMemory with old_weight = 1 - its momentum)."""
    rows = torch.index_select(memory, 0, index).to(x.dtype) * old_weight + x * (1 - old_weight)
    memory.index_copy_(0, index, F.normalize(rows, dim=1).to(memory.dtype))


class PeerNCE:
    """lemniscate's NCEAverage + NCECriterion (eps=LEMNISCATE_EPS), or VISSL's NCELossWithMemory
    (eps=VISSL_EPS; loss_type "nce" or "cross_entropy"). `Z_peer` is the peer's constant
    (N x mean exp s), None until the first batch."""

    def __init__(self, memory: torch.Tensor, num_negatives: int, temperature: float = 0.07,
                 momentum: float = 0.5, eps: float = LEMNISCATE_EPS, loss_type: str = "nce"):
        self.memory = memory
        self.num_items = memory.shape[0]
        self.num_negatives = num_negatives
        self.temperature, self.momentum, self.eps, self.loss_type = temperature, momentum, eps, loss_type
        self.Z_peer: Optional[torch.Tensor] = None
        self.sampler = AliasSampler(torch.ones(self.num_items, device=memory.device))

    def draw(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K + 1): column 0 the positive, then K uniform draws with replacement."""
        columns = self.sampler.draw(index.numel() * (self.num_negatives + 1)).view(index.numel(), -1)
        columns[:, 0] = index
        return columns

    def loss(self, embeddings: torch.Tensor, index: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings, dim=1)
        scores = gather_scores(x, self.memory, columns, self.temperature)
        if self.loss_type == "cross_entropy":
            return F.cross_entropy(scores, torch.zeros_like(index))
        p = torch.exp(scores)
        if self.Z_peer is None:
            self.Z_peer = p.detach().mean() * self.num_items
        return nce_criterion(p / self.Z_peer, self.num_items, self.eps)

    def update(self, embeddings: torch.Tensor, index: torch.Tensor) -> None:
        index_copy_update_(self.memory, index, F.normalize(embeddings.detach(), dim=1), self.momentum)

    def step(self, embeddings: torch.Tensor, index: torch.Tensor, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw (unless given), loss, backward, update: one training step's work."""
        loss = self.loss(embeddings, index, self.draw(index) if columns is None else columns)
        loss.backward()
        self.update(embeddings, index)
        return loss.detach()


class PeerLinearAverage:
    """lemniscate's LinearAverage + CrossEntropyLoss: the softmax over all N rows of <x, M[j]> / T."""

    def __init__(self, memory: torch.Tensor, temperature: float = 0.07, momentum: float = 0.5):
        self.memory, self.temperature, self.momentum = memory, temperature, momentum

    def loss(self, embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings, dim=1)
        return F.cross_entropy(x @ self.memory.to(x.dtype).T / self.temperature, index)

    def update(self, embeddings: torch.Tensor, index: torch.Tensor) -> None:
        index_copy_update_(self.memory, index, F.normalize(embeddings.detach(), dim=1), self.momentum)

    def step(self, embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        loss = self.loss(embeddings, index)
        loss.backward()
        self.update(embeddings, index)
        return loss.detach()


class PeerCMC:
    """CMC's NCEAverage for two views: l against memory_ab, ab against memory_l, a Z_peer each,
    the sum of the two NCE criteria (eps=LEMNISCATE_EPS)."""

    def __init__(self, memory_l: torch.Tensor, memory_ab: torch.Tensor, num_negatives: int,
                 temperature: float = 0.07, momentum: float = 0.5):
        self.memory_l, self.memory_ab = memory_l, memory_ab
        self.num_items = memory_l.shape[0]
        self.num_negatives, self.temperature, self.momentum = num_negatives, temperature, momentum
        self.Z_l: Optional[torch.Tensor] = None
        self.Z_ab: Optional[torch.Tensor] = None
        self.sampler = AliasSampler(torch.ones(self.num_items, device=memory_l.device))

    def draw(self, index: torch.Tensor) -> torch.Tensor:
        columns = self.sampler.draw(index.numel() * (self.num_negatives + 1)).view(index.numel(), -1)
        columns[:, 0] = index
        return columns

    def loss(self, l_emb: torch.Tensor, ab_emb: torch.Tensor, index: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        l, ab = F.normalize(l_emb, dim=1), F.normalize(ab_emb, dim=1)
        out_l = torch.exp(gather_scores(l, self.memory_ab, columns, self.temperature))
        out_ab = torch.exp(gather_scores(ab, self.memory_l, columns, self.temperature))
        if self.Z_l is None:
            self.Z_l = out_l.detach().mean() * self.num_items
            self.Z_ab = out_ab.detach().mean() * self.num_items
        return (nce_criterion(out_l / self.Z_l, self.num_items, LEMNISCATE_EPS)
                + nce_criterion(out_ab / self.Z_ab, self.num_items, LEMNISCATE_EPS))

    def update(self, l_emb: torch.Tensor, ab_emb: torch.Tensor, index: torch.Tensor) -> None:
        index_copy_update_(self.memory_l, index, F.normalize(l_emb.detach(), dim=1), self.momentum)
        index_copy_update_(self.memory_ab, index, F.normalize(ab_emb.detach(), dim=1), self.momentum)

    def step(self, l_emb: torch.Tensor, ab_emb: torch.Tensor, index: torch.Tensor,
             columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        loss = self.loss(l_emb, ab_emb, index, self.draw(index) if columns is None else columns)
        loss.backward()
        self.update(l_emb, ab_emb, index)
        return loss.detach()


class PeerNPID:
    """mmselfsup's NPID: SimpleMemory (momentum m' on the new feature) and the sampled softmax
    over the positive and K drawn negatives (ContrastiveHead + CrossEntropyLoss)."""

    def __init__(self, feature_bank: torch.Tensor, num_negatives: int, temperature: float = 0.07,
                 momentum: float = 0.5):
        self.feature_bank = feature_bank
        self.num_negatives, self.temperature, self.momentum = num_negatives, temperature, momentum
        self.sampler = AliasSampler(torch.ones(feature_bank.shape[0], device=feature_bank.device))

    def draw(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K): the negatives alone (NPID draws them apart from the positive)."""
        return self.sampler.draw(index.numel() * self.num_negatives).view(index.numel(), -1)

    def loss(self, embeddings: torch.Tensor, index: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings, dim=1)
        positive = (torch.index_select(self.feature_bank, 0, index).to(x.dtype) * x).sum(1, keepdim=True)
        batch, k = negatives.shape
        rows = torch.index_select(self.feature_bank, 0, negatives.reshape(-1)).view(batch, k, -1).to(x.dtype)
        negative = torch.bmm(rows, x.unsqueeze(2)).squeeze(2)
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros_like(index))

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, index: torch.Tensor) -> None:
        feature = F.normalize(F.normalize(embeddings.detach(), dim=1), dim=1)
        old = self.feature_bank[index].to(feature.dtype)
        self.feature_bank[index] = F.normalize((1 - self.momentum) * old + self.momentum * feature, dim=1).to(
            self.feature_bank.dtype)

    def step(self, embeddings: torch.Tensor, index: torch.Tensor, negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
        loss = self.loss(embeddings, index, self.draw(index) if negatives is None else negatives)
        loss.backward()
        self.update(embeddings, index)
        return loss.detach()
