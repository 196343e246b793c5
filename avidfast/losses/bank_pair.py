"""The state and steps that AVIDLoss and CMALoss share: two banks, partition estimates, a step.

A step's state change (the bank update, new partition estimates Z, the step counter) is staged by
the forward pass and applied by :meth:`BankPairLoss.commit` only when everything it writes is
finite (docs/method.md, "Non-finite steps").
"""
import logging
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.distributed import BatchLayout, all_reduce_sum, is_distributed
from avidfast.errors import NonFiniteError
from avidfast.losses.memory_bank import MemoryBank

log = logging.getLogger(__name__)

# A pair scores one modality's embeddings ("v" video, "a" audio) against one modality's bank:
# "v2a" = video embeddings against the audio bank. Each pair has its own partition estimate Z.
PAIRS = ("v2a", "a2v", "v2v", "a2a")
# How the partition constants are kept: "shared", one Z for every pair (the reference code's single
# NCE criterion), or "per_pair", one estimate per pair.
PARTITIONS = ("shared", "per_pair")
# What a forward pass does with a batch whose loss or state change is not finite.
NON_FINITE = ("raise", "skip")


class PendingUpdate(NamedTuple):
    """What one forward pass staged: the batch (normalised, detached) and its layout over the ranks,
    and the partition estimates Z it made (pair -> float32 scalar) for pairs that had none."""

    layout: BatchLayout
    index: torch.Tensor
    video: torch.Tensor
    audio: torch.Tensor
    partitions: Dict[str, torch.Tensor]


class BankPairLoss(nn.Module):
    """Video and audio memory banks with partition estimates and a step counter.

    Buffers (in state_dict, so that a checkpoint resumes exactly): video_memory.memory and
    audio_memory.memory (N, D); Z (4,), one entry per pair of PAIRS, <= 0 until estimated; step, an
    int64 scalar that seeds each step's negative draws (the number of updates applied).

    Partition constants (``partition``): "shared" (default, the reference code's) keeps one Z for
    every pair, estimated on the first step from the first term the loss scores (its first pair,
    over that term's negatives) and written into all four entries; a state_dict whose estimated
    entries differ (a "per_pair" checkpoint) is loaded as their mean, as the reference loads the
    partition constants of a checkpoint. "per_pair" estimates each pair's Z on its first use.

    Each forward pass computes the loss against the current banks and *stages* the step's state
    change (:class:`PendingUpdate`): the all-gathered update of both banks, the Z of pairs used
    for the first time, step + 1. ``forward(..., commit=True)`` (the default) applies it before
    returning, if the loss (agreed over ranks), the new Z and the gathered embeddings are all
    finite; otherwise nothing changes and, per ``non_finite``, NonFiniteError is raised ("raise")
    or the batch is counted in ``skipped_updates`` and its (non-finite) loss returned ("skip").
    ``forward(..., commit=False)`` leaves the change pending: call :meth:`commit` once the loss
    and the gradients are known finite (the training step does), or :meth:`discard`.
    """

    def __init__(self, num_items: int, dim: int, num_negatives: int, temperature: float,
                 momentum: float, bank_dtype: torch.dtype, seed: int, non_finite: str = "raise",
                 partition: str = "shared"):
        super().__init__()
        if non_finite not in NON_FINITE:
            raise ValueError(f"non_finite must be one of {NON_FINITE}, got {non_finite!r}")
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        if not isinstance(num_negatives, int) or not 1 <= num_negatives < num_items - 1:
            raise ValueError(
                f"num_negatives must be an int in [1, num_items - 2] = [1, {num_items - 2}], "
                f"got {num_negatives!r}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        generator = torch.Generator().manual_seed(seed)
        self.video_memory = MemoryBank(num_items, dim, bank_dtype, generator=generator)
        self.audio_memory = MemoryBank(num_items, dim, bank_dtype, generator=generator)
        self.num_items = num_items
        self.dim = dim
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.non_finite = non_finite
        self.partition_mode = partition
        self.skipped_updates = 0  # batches whose state change was refused (non_finite="skip")
        self._pending: Optional[PendingUpdate] = None
        self.register_buffer("Z", torch.full((len(PAIRS),), -1.0))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._estimated = set()
        self.register_load_state_dict_post_hook(_refresh_estimated_pairs)

    def banks(self) -> Dict[str, MemoryBank]:
        return {"v": self.video_memory, "a": self.audio_memory}

    def partition(self, pair: str) -> torch.Tensor:
        """Z of `pair` (a one-element view of the Z buffer)."""
        return self.Z[PAIRS.index(pair)]

    def normalized_batch(self, video_emb: torch.Tensor, audio_emb: torch.Tensor,
                         index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Checks a batch and returns {"v": video, "a": audio} embeddings, L2-normalised."""
        for name, emb in (("video_emb", video_emb), ("audio_emb", audio_emb)):
            if emb.dim() != 2 or emb.shape[1] != self.dim or not emb.is_floating_point():
                raise ValueError(
                    f"{name} must be a floating (batch, {self.dim}) tensor, got {emb.dtype} "
                    f"of shape {tuple(emb.shape)}"
                )
        if video_emb.shape[0] != audio_emb.shape[0]:
            raise ValueError(
                f"video_emb has {video_emb.shape[0]} rows but audio_emb has {audio_emb.shape[0]}"
            )
        if index.dim() != 1 or index.dtype != torch.int64 or index.shape[0] != video_emb.shape[0]:
            raise ValueError(
                f"index must be an int64 tensor of shape ({video_emb.shape[0]},), got "
                f"{index.dtype} of shape {tuple(index.shape)}"
            )
        return {"v": F.normalize(video_emb, dim=1), "a": F.normalize(audio_emb, dim=1)}

    @torch.no_grad()
    def estimate_partitions(self, uses: Sequence[Tuple[str, torch.Tensor]],
                            embeddings: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """New partition estimates for the pairs that have none yet, from the step's scores.

        Args:
            uses: (pair, negatives (B, K_t)) of every term direction, in the order the loss scores
                them. "shared": when Z is unset, the first use gives the one estimate, returned for
                every pair of PAIRS. "per_pair": each unestimated pair, from its first use.
            embeddings: {"v": (B, D), "a": (B, D)} normalised embeddings.

        Returns:
            pair -> float32 scalar, the mean of exp(negative scores) over all ranks (one
            all-reduce), identical on every rank. Not stored here: :meth:`commit` stores them
            when finite and positive (so a non-finite first batch leaves Z unset).
        """
        if self.partition_mode == "shared":
            targets = [] if self._estimated else list(uses[:1])
        else:
            first: Dict[str, torch.Tensor] = {}
            for pair, negatives in uses:
                first.setdefault(pair, negatives)
            targets = [(pair, negatives) for pair, negatives in first.items() if pair not in self._estimated]
        if not targets:
            return {}
        banks = self.banks()
        sums = [banks[pair[2]].scores(embeddings[pair[0]], negatives, self.temperature).exp().sum(dtype=torch.float64)
                for pair, negatives in targets]
        counts = [torch.tensor(float(negatives.numel()), dtype=torch.float64, device=negatives.device)
                  for _, negatives in targets]
        totals = all_reduce_sum(torch.stack(sums + counts))
        estimates = {pair: (totals[i] / totals[len(targets) + i]).to(self.Z.dtype) for i, (pair, _) in enumerate(targets)}
        if self.partition_mode == "shared":
            return {pair: estimates[targets[0][0]] for pair in PAIRS}
        return estimates

    def pair_loss(self, pair: str, embeddings: Dict[str, torch.Tensor], pos_idx: torch.Tensor,
                  neg_idx: torch.Tensor, partitions: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """NCE loss (mean over the batch) of `pair` with positives pos_idx and negatives neg_idx,
        with the pair's Z (or its new estimate in ``partitions``, from :meth:`estimate_partitions`).
        A new estimate that is not finite and positive is replaced by 1 here (the operator refuses
        it); :meth:`stage` then makes the step's loss NaN."""
        bank = self.banks()[pair[2]]
        z = (partitions or {}).get(pair)
        if z is None:
            z = self.partition(pair)
        elif not _usable_partition(z):
            z = torch.ones_like(z)
        return bank.nce_loss(embeddings[pair[0]], pos_idx, neg_idx, self.temperature, z)

    def check_nothing_pending(self) -> None:
        """RuntimeError when a previous forward(..., commit=False) was neither committed nor discarded."""
        if self._pending is not None:
            raise RuntimeError(
                f"{type(self).__name__}: the previous batch's bank update is still pending (forward was called "
                "with commit=False): call commit() or discard() before the next forward"
            )

    def stage(self, loss: torch.Tensor, logs: Dict[str, torch.Tensor], layout: BatchLayout, index: torch.Tensor,
              embeddings: Dict[str, torch.Tensor], partitions: Dict[str, torch.Tensor],
              commit: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The end of every forward pass: stages the state change of the batch and, with ``commit``,
        applies it now if it is finite (else raises or skips, per ``non_finite``); returns
        (loss, logs), the loss NaN when a new partition estimate is unusable."""
        if partitions and not all(_usable_partition(z) for z in partitions.values()):
            loss = loss + float("nan")  # the terms used a stand-in Z: this step has no loss
            logs = dict(logs, loss=loss.detach())
        self._pending = PendingUpdate(layout, index, embeddings["v"].detach(), embeddings["a"].detach(), partitions)
        if not commit:
            return loss, logs
        if not bool(_agreed_finite(loss.detach())):
            reason = self._refusal(self._pending) or f"the loss is {float(loss):g}"
            self.discard()
        else:
            reason = self._apply_pending()
        if reason is not None:
            self._refuse(reason)
        return loss, logs

    @torch.no_grad()
    def commit(self) -> bool:
        """Applies the pending state change of the last forward(..., commit=False): both banks'
        momentum update with (index, v, a) from every rank in rank order, the new Z estimates,
        step + 1. Returns False, changing nothing, when the new Z or any gathered embedding is not
        finite (the same decision on every rank: it reads all-gathered and all-reduced values).
        Collective under torch.distributed: every rank calls it, or every rank calls discard()."""
        if self._pending is None:
            raise RuntimeError(f"{type(self).__name__}.commit(): nothing to commit (forward(..., commit=False) first)")
        return self._apply_pending() is None

    def discard(self) -> None:
        """Drops the pending state change of the last forward pass (banks, Z and step stay as they were)."""
        self._pending = None

    def _apply_pending(self) -> Optional[str]:
        """Applies and clears the pending change; returns None, or why nothing was applied."""
        pending, self._pending = self._pending, None
        all_index, all_video, all_audio = pending.layout.all_gather([pending.index, pending.video, pending.audio])
        reason = self._refusal(pending)
        if reason is None and not bool(torch.isfinite(all_video).all() & torch.isfinite(all_audio).all()):
            reason = "the batch's embeddings (gathered from every rank) are not all finite"
        if reason is not None:
            return reason
        self.video_memory.update_(all_index, all_video, self.momentum)
        self.audio_memory.update_(all_index, all_audio, self.momentum)
        for pair, z in pending.partitions.items():
            self.Z[PAIRS.index(pair)] = z
            self._estimated.add(pair)
        self.step += 1
        return None

    def _refusal(self, pending: PendingUpdate) -> Optional[str]:
        bad = {pair: z for pair, z in pending.partitions.items() if not _usable_partition(z)}
        if not bad:
            return None
        if self.partition_mode == "shared":
            values = f"{float(next(iter(bad.values()))):g}, shared by every pair"
        else:
            values = ", ".join(f"{pair} {float(z):g}" for pair, z in bad.items())
        return f"the first estimates of the partition constant Z are not finite and positive ({values}): Z stays unset"

    def _refuse(self, reason: str) -> None:
        where = f"step {int(self.step)}" + (f", rank {torch.distributed.get_rank()}" if is_distributed() else "")
        message = (f"{type(self).__name__} ({where}): {reason}; the banks, Z and the step counter are unchanged")
        if self.non_finite == "raise":
            raise NonFiniteError(message + ". Non-finite embeddings usually come from the network (a learning rate "
                                 "too high, float16 overflow); pass non_finite='skip' to skip such batches instead")
        self.skipped_updates += 1
        log.warning("%s; batch skipped (%d so far)", message, self.skipped_updates)


def _usable_partition(z: torch.Tensor) -> bool:
    return bool(torch.isfinite(z) & (z > 0))


def _agreed_finite(loss: torch.Tensor) -> torch.Tensor:
    """True when ``loss`` is finite on every rank (one all-reduce under torch.distributed)."""
    bad = (~torch.isfinite(loss)).to(torch.float32).reshape(1)
    return all_reduce_sum(bad)[0] == 0


def weighted_terms(terms: Dict[str, Tuple[float, torch.Tensor]]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """sum_t w_t L_t over terms {name: (normalised weight, loss)}, and detached logs."""
    loss = torch.stack([weight * value for weight, value in terms.values()]).sum()
    logs = {f"loss/{name}": value.detach() for name, (_, value) in terms.items()}
    logs["loss"] = loss.detach()
    return loss, logs


def _refresh_estimated_pairs(module: BankPairLoss, incompatible_keys) -> None:
    module._pending = None  # a staged change belongs to the state it was computed from
    if module.partition_mode == "shared":
        estimated = module.Z[module.Z > 0]
        if estimated.numel():
            with torch.no_grad():
                module.Z.fill_(float(estimated.double().mean()))  # the reference's rule: the mean of the constants
    module._estimated = {pair for pair, z in zip(PAIRS, module.Z.tolist()) if z > 0}
