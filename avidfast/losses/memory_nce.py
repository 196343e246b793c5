"""MemoryNCE: instance discrimination against one memory bank (Wu et al., CVPR 2018), the
single-modality counterpart of AVIDLoss (docs/migration.md shows the peer code it replaces)."""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.distributed import BatchLayout, all_reduce_sum
from avidfast.losses.memory_bank import MemoryBank
from avidfast.ops import (
    estimate_partition,
    memory_scores,
    memory_update_,
    nce_memory_loss,
    sample_negatives,
)
from avidfast.ops._extension import OPS
from avidfast.ops.nce import differentiable_once
from avidfast.ops.update import DUPLICATES, NONFINITE

# What the loss of a row is (see MemoryNCE).
OBJECTIVES = ("nce", "infonce", "softmax")
# Which scores the first-step estimate of Z averages.
PARTITION_ESTIMATES = ("negatives", "with_positive")


class MemoryNCE(nn.Module):
    """Instance discrimination with one memory bank: N slots, one per training instance.

    Each step: L2-normalise the embeddings; compute the loss of every row against the bank, with
    the row's own slot as the positive; then, without gradient, update the bank with
    (index, embedding) all-gathered from every rank, in rank order (avidfast.ops.memory_update_:
    normalize(m * row + (1 - m) * x)), and advance the step counter.

    Objectives (s = <x_b, M[j]> / T):
      * "nce" (default; lemniscate's NCEAverage + NCECriterion, VISSL's NCELossWithMemory with
        loss_type "nce"): K negatives drawn uniformly from the other N - 1 slots (avidfast's
        counter-based sampler, keyed by (seed, step)), and the NCE loss of docs/method.md,
        L_b = -log(e^{s+} / (e^{s+} + K Z)) - sum_k log(K Z / (e^{s_k} + K Z)). Z is estimated on
        the first step (over every rank) as the mean of exp(s) over the negatives, or over the
        positive and the negatives with ``partition_estimate="with_positive"`` (lemniscate's
        estimate, which then keeps N times this value: avidfast's Z is the peer's Z / N), and
        then frozen; it is the ``Z`` buffer.
      * "infonce" (mmselfsup's NPID: ContrastiveHead + CrossEntropyLoss; VISSL with loss_type
        "cross_entropy"): the same K negatives, L_b = -log softmax([s+, s_1 .. s_K])_0.
      * "softmax" (lemniscate's LinearAverage + CrossEntropyLoss, the "non-parametric softmax"):
        L_b = -log softmax over all N slots, at the row's own slot. Reads the whole bank.
    The loss is the mean over the local batch. Every objective computes its gradient in x while
    it reads the bank (the bank is not kept for the backward pass), so the in-forward update is
    safe; the gradient is first-order only.

    Buffers (state_dict): bank.memory (N, D); Z (float64 scalar, <= 0 until estimated; "nce"
    only); step (int64 scalar, the number of updates, which keys the negative draws). A resumed
    module continues exactly as an uninterrupted one. Under torch.distributed every rank holds
    the same bank and Z, and draws what one process holding the whole batch would draw. Under
    torch.compile the step counter and Z are tensors, so a compiled step compiles once (the
    first-step estimate of Z runs outside the graph).

    Args:
        num_items: N, the number of training instances (memory slots).
        dim: embedding size D.
        num_negatives: K negatives per row ("nce", "infonce"); lemniscate's nce_k.
        temperature: T; lemniscate's nce_t.
        momentum: m of the bank update, the weight of the *old* row (lemniscate's nce_m, VISSL's
            momentum; mmselfsup's SimpleMemory weights the new feature: use 1 - its momentum).
        objective: "nce", "infonce" or "softmax" (above).
        partition_estimate: "negatives" (AVIDLoss's) or "with_positive" (lemniscate's, CMC's,
            VISSL's).
        bank_dtype: storage dtype of the bank (float32, bfloat16, float16, float64).
        seed: seeds the initial bank and the negative draws.
        duplicates: how an index repeated in one (gathered) batch updates the bank: "sequential"
            (batch order, AVID's) or "last" (one write from the old row, the peers' index_copy_);
            see avidfast.ops.memory_update_.
        nonfinite: what the bank update does with a non-finite embedding row: "raise" (default),
            "skip" or "write"; see avidfast.ops.memory_update_.
    """

    def __init__(
        self,
        num_items: int,
        dim: int = 128,
        num_negatives: int = 4096,
        temperature: float = 0.07,
        momentum: float = 0.5,
        *,
        objective: str = "nce",
        partition_estimate: str = "negatives",
        bank_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        duplicates: str = "sequential",
        nonfinite: str = "raise",
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if partition_estimate not in PARTITION_ESTIMATES:
            raise ValueError(f"partition_estimate must be one of {PARTITION_ESTIMATES}, got {partition_estimate!r}")
        if duplicates not in DUPLICATES:
            raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        if objective != "softmax" and (not isinstance(num_negatives, int)
                                       or not 1 <= num_negatives < num_items - 1):
            raise ValueError(
                f"num_negatives must be an int in [1, num_items - 2] = [1, {num_items - 2}], got {num_negatives!r}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        self.bank = MemoryBank(num_items, dim, bank_dtype, seed=seed)
        self.num_items = num_items
        self.dim = dim
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.objective = objective
        self.partition_estimate = partition_estimate
        self.seed = int(seed)
        self.duplicates = duplicates
        self.nonfinite = nonfinite
        self.register_buffer("Z", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._estimated = False
        self.register_load_state_dict_post_hook(_refresh_estimated)

    def forward(self, embeddings: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of one batch, then the bank update.

        Args:
            embeddings: (B, D) embeddings (normalised here), any float dtype, on the bank's device.
            index: (B,) int64 memory slot of each row (its instance's index in the dataset).

        Returns:
            (loss, logs): scalar loss (float32; float64 for float64 embeddings), the mean over the
            local batch; logs maps "loss" to its detached value.
        """
        x = F.normalize(self._checked(embeddings, index), dim=1)
        memory = self.bank.memory
        layout = BatchLayout.exchange(index.shape[0], index.device)
        if self.objective == "softmax":
            loss = _PrecomputedGradient.apply(x, *_full_softmax(x.detach(), memory, index, self.temperature))
        else:
            negatives = sample_negatives(index, self.num_items, self.num_negatives, self.seed, self.step,
                                         row_offset=layout.offset)
            if self.objective == "nce":
                self._estimate_partition(x.detach(), index, negatives)
                loss = nce_memory_loss(x, memory, index, negatives, self.temperature, self.Z)
            else:
                columns = torch.cat([index.unsqueeze(1), negatives], dim=1)
                loss = _PrecomputedGradient.apply(x, *_sampled_softmax(x.detach(), memory, columns, self.temperature))
        self._update(layout, index, x)
        return loss, {"loss": loss.detach()}

    def _checked(self, embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        memory = self.bank.memory
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or not embeddings.is_floating_point():
            raise ValueError(f"embeddings must be a floating (batch, {self.dim}) tensor, got {embeddings.dtype} "
                             f"of shape {tuple(embeddings.shape)}")
        if index.dim() != 1 or index.dtype != torch.int64 or index.shape[0] != embeddings.shape[0]:
            raise ValueError(f"index must be an int64 tensor of shape ({embeddings.shape[0]},), got {index.dtype} "
                             f"of shape {tuple(index.shape)}")
        for name, t in (("embeddings", embeddings), ("index", index)):
            if t.device != memory.device:
                raise ValueError(f"{name} is on {t.device} but the bank is on {memory.device}: move the batch "
                                 "or the module (.to(device)) so that they are on one device")
        return embeddings

    @torch.compiler.disable  # once per run: eager, so that the compiled step has no branch on it
    @torch.no_grad()
    def _estimate_partition(self, x: torch.Tensor, index: torch.Tensor, negatives: torch.Tensor) -> None:
        """Fixes Z on the first step: the mean of exp(scores) over every rank (one all-reduce)."""
        if self._estimated:
            return
        positives = index if self.partition_estimate == "with_positive" else None
        local = estimate_partition(x, self.bank.memory, negatives, self.temperature, pos_idx=positives)
        count = negatives.numel() + (index.numel() if positives is not None else 0)
        total, everyone = all_reduce_sum(torch.stack([local * count, local.new_tensor(float(count))]))
        z = total / everyone
        if not bool(torch.isfinite(z) & (z > 0)):
            raise ValueError(f"MemoryNCE: the first batch gives the partition estimate Z = {float(z):g}; the "
                             "embeddings hold NaN or inf. Z stays unset and the bank unchanged")
        self.Z.copy_(z)
        self._estimated = True

    @torch.no_grad()
    def _update(self, layout: BatchLayout, index: torch.Tensor, x: torch.Tensor) -> None:
        all_index, all_x = layout.all_gather([index, x])
        memory_update_(self.bank.memory, all_index, all_x, self.momentum, duplicates=self.duplicates,
                       nonfinite=self.nonfinite)
        self.step += 1

    @torch.no_grad()
    def load_peer_memory(self, memory: torch.Tensor, peer_Z: Optional[float] = None) -> None:
        """Starts from a peer's bank and partition constant, converted to avidfast's convention.

        Args:
            memory: (N, D) bank: lemniscate's / VISSL's NCEAverage.memory, CMC's memory_l or
                memory_ab, mmselfsup's SimpleMemory.feature_bank. Copied as it is.
            peer_Z: the peer's partition constant (lemniscate's params[2], VISSL's norm_constant),
                N x mean(exp s); stored as Z = peer_Z / N. None or <= 0: estimated on the next step.
        """
        if tuple(memory.shape) != tuple(self.bank.memory.shape):
            raise ValueError(f"memory has shape {tuple(memory.shape)} but this bank is "
                             f"{tuple(self.bank.memory.shape)}")
        self.bank.memory.copy_(memory)
        if peer_Z is not None and float(peer_Z) > 0:
            self.Z.fill_(float(peer_Z) / self.num_items)
            self._estimated = True
        else:
            self.Z.fill_(-1.0)
            self._estimated = False

    def extra_repr(self) -> str:
        return (
            f"objective={self.objective}, num_items={self.num_items}, dim={self.dim}, "
            f"num_negatives={self.num_negatives}, temperature={self.temperature}, momentum={self.momentum}, "
            f"partition_estimate={self.partition_estimate}, duplicates={self.duplicates}, seed={self.seed}"
        )


def _refresh_estimated(module: MemoryNCE, incompatible_keys) -> None:
    module._estimated = bool(module.Z > 0)


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sampled_softmax(x: torch.Tensor, memory: torch.Tensor, columns: torch.Tensor,
                     temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows' cross-entropy over the scores of `columns` (target: column 0) and its gradient in x,
    from two fused passes over the rows (scores, then the gradient's weighted sum)."""
    scores = memory_scores(x, memory, columns, temperature)
    row_loss = torch.logsumexp(scores, dim=1) - scores[:, 0]
    weights = torch.softmax(scores, dim=1)
    weights[:, 0] -= 1
    return row_loss, OPS.memory_scores_backward(weights, memory, columns, temperature)


def _full_softmax(x: torch.Tensor, memory: torch.Tensor, index: torch.Tensor,
                  temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows' cross-entropy over all N slots (target: their own) and its gradient in x."""
    dtype = _accumulate(x.dtype)
    bank = memory.to(dtype)
    logits = x.to(dtype) @ bank.T / temperature
    row_loss = torch.logsumexp(logits, dim=1) - logits.gather(1, index.unsqueeze(1)).squeeze(1)
    weights = torch.softmax(logits, dim=1)
    weights[torch.arange(index.shape[0], device=index.device), index] -= 1
    return row_loss, weights @ bank / temperature


class _PrecomputedGradient(torch.autograd.Function):
    """mean_b row_loss[b] with the gradient in x computed by the forward pass (grad_rows = dL_b/dx_b),
    so that the bank need not be kept for backward (it is updated before it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, row_loss: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_rows, x)
        ctx.batch = row_loss.shape[0]
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_rows, x = ctx.saved_tensors
        grad_x = (grad_loss * grad_rows / ctx.batch).to(x.dtype)
        if torch.is_grad_enabled():
            grad_x = differentiable_once(grad_x, x, "MemoryNCE")
        return grad_x, None, None

