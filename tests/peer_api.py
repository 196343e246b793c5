"""Stand-ins with the peers' class names and call signatures, for running the "before" snippets of
docs/migration.md. Their arithmetic is avidfast.bench.peers (the peers' published equations),
not the peers' code. Negative draws go through `Draws`, so that a test hands a peer and avidfast
the same indices (the peers draw with an alias table, avidfast with its counter-based sampler).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.bench import peers
from avidfast.ops import sample_negatives


class Draws:
    """avidfast's draws for (seed, step), handed to a peer: K negatives per row of `index`.

    prepare(index) is called by the test before each step; the peer's alias table draw(count)
    then returns those negatives (flattened), or, with `with_positive`, the K + 1 columns that
    lemniscate-style samplers produce (column 0 then overwritten with the positive)."""

    def __init__(self, num_items: int, num_negatives: int, seed: int = 0):
        self.num_items, self.num_negatives, self.seed = num_items, num_negatives, seed
        self.step = 0
        self.negatives: Optional[torch.Tensor] = None

    def prepare(self, index: torch.Tensor) -> None:
        self.negatives = sample_negatives(index, self.num_items, self.num_negatives, self.seed, self.step)
        self.step += 1

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        return torch.cat([index[:, None], self.negatives], 1)

    def draw(self, count: int) -> torch.Tensor:
        assert count == self.negatives.numel(), "the snippet drew another number of negatives"
        return self.negatives.reshape(-1)


# The Draws object of the snippet being run; the test sets it.
DRAWS: Optional[Draws] = None


def _uniform_init(num_items: int, dim: int) -> torch.Tensor:
    """lemniscate's / CMC's initial memory: uniform in [-stdv, stdv], stdv = 1 / sqrt(dim / 3)."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_items, dim).mul_(2 * stdv).add_(-stdv)


class NCEAverage(nn.Module):
    """lemniscate's NCEAverage(inputSize, outputSize, K, T, momentum): forward(x, y) -> (B, K + 1)
    exp(s / T) / Z with Z = N x mean of the first batch (params = [K, T, Z, momentum]); the memory
    update with x happens in the same call (lemniscate does it in the backward pass)."""

    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5, Z=None):
        super().__init__()
        self.register_buffer("params", torch.tensor([K, T, -1.0, momentum]))
        self.register_buffer("memory", _uniform_init(outputSize, inputSize))

    def forward(self, x, y):
        k, t, z, m = self.params.tolist()
        columns = DRAWS.columns(y)
        p = torch.exp(peers.gather_scores(x, self.memory, columns, t))
        if z < 0:
            self.params[2] = p.detach().mean() * self.memory.shape[0]
        out = p / self.params[2]
        peers.index_copy_update_(self.memory, y, x.detach(), m)
        return out


class NCECriterion(nn.Module):
    """lemniscate's NCECriterion(nLem): forward(x, targets) on NCEAverage's output (CMC's forward(x))."""

    def __init__(self, nLem):
        super().__init__()
        self.nLem = nLem

    def forward(self, x, targets=None):
        return peers.nce_criterion(x, self.nLem, peers.LEMNISCATE_EPS)


class LinearAverage(nn.Module):
    """lemniscate's LinearAverage(inputSize, outputSize, T, momentum): forward(x, y) -> (B, N) s / T."""

    def __init__(self, inputSize, outputSize, T=0.07, momentum=0.5):
        super().__init__()
        self.register_buffer("params", torch.tensor([T, momentum]))
        self.register_buffer("memory", _uniform_init(outputSize, inputSize))

    def forward(self, x, y):
        t, m = self.params.tolist()
        out = x @ self.memory.clone().T / t  # lemniscate reads the rows before it updates them
        peers.index_copy_update_(self.memory, y, x.detach(), m)
        return out


class CMCNCEAverage(nn.Module):
    """CMC's NCEAverage(inputSize, outputSize, K, T, momentum): forward(l, ab, y) -> (out_l, out_ab),
    l scored against memory_ab and ab against memory_l, Z each (params = [K, T, Z_l, Z_ab, momentum])."""

    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5):
        super().__init__()
        self.register_buffer("params", torch.tensor([K, T, -1.0, -1.0, momentum]))
        self.register_buffer("memory_l", _uniform_init(outputSize, inputSize))
        self.register_buffer("memory_ab", _uniform_init(outputSize, inputSize))

    def forward(self, l, ab, y):
        k, t, z_l, z_ab, m = self.params.tolist()
        columns = DRAWS.columns(y)
        out_l = torch.exp(peers.gather_scores(l, self.memory_ab, columns, t))
        out_ab = torch.exp(peers.gather_scores(ab, self.memory_l, columns, t))
        n = self.memory_l.shape[0]
        if z_l < 0:
            self.params[2] = out_l.detach().mean() * n
        if z_ab < 0:
            self.params[3] = out_ab.detach().mean() * n
        out_l, out_ab = out_l / self.params[2], out_ab / self.params[3]
        peers.index_copy_update_(self.memory_l, y, l.detach(), m)
        peers.index_copy_update_(self.memory_ab, y, ab.detach(), m)
        return out_l, out_ab


class NCELossWithMemory(nn.Module):
    """VISSL's NCELossWithMemory(loss_config): forward(output, target) -> loss ("nce" with
    float32-epsilon criterion, or "cross_entropy"), memory updated on forward."""

    def __init__(self, loss_config):
        super().__init__()
        memory = loss_config["memory_params"]
        self.peer = peers.PeerNCE(
            _uniform_init(loss_config["num_train_samples"], memory["embedding_dim"]),
            loss_config["negative_sampling_params"]["num_negatives"], loss_config["temperature"],
            memory["momentum"], eps=peers.VISSL_EPS, loss_type=loss_config["loss_type"])
        if memory.get("norm_init", True):
            self.peer.memory = F.normalize(self.peer.memory, dim=1)
        self.norm_embedding = loss_config["norm_embedding"]

    @property
    def memory(self):
        return self.peer.memory

    def forward(self, output, target):
        x = F.normalize(output, dim=1) if self.norm_embedding else output
        loss = self.peer.loss(x, target, DRAWS.columns(target))
        self.peer.update(x, target)
        return loss


class _Multinomial:
    def draw(self, count):
        return DRAWS.draw(count)


class SimpleMemory(nn.Module):
    """mmselfsup's SimpleMemory(length, feat_dim, momentum): feature_bank, multinomial.draw(n),
    update(idx, feature): normalize((1 - momentum) old + momentum normalize(feature))."""

    def __init__(self, length, feat_dim, momentum):
        super().__init__()
        self.feature_bank = F.normalize(torch.randn(length, feat_dim), dim=1)
        self.momentum = momentum
        self.multinomial = _Multinomial()

    def update(self, idx, feature):
        peers.PeerNPID(self.feature_bank, 1, momentum=self.momentum).update(feature, idx)


class ContrastiveHead(nn.Module):
    """mmselfsup's ContrastiveHead(temperature): (pos (B, 1), neg (B, K)) -> (logits / T, zeros)."""

    def __init__(self, temperature=0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, pos, neg):
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        return logits, torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
