"""CMALoss: cross-modal agreement on top of AVID's memory banks (docs/method.md, CMA)."""
import math
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from avidfast.distributed import BatchLayout, is_distributed
from avidfast.losses.avid import AVIDLoss
from avidfast.losses.bank_pair import BankPairLoss, weighted_terms
from avidfast.ops import cma_topk, sample_negatives, sorted_positives
from avidfast.ops.cma import AGREEMENTS

# Each term is the mean of its two directions; the pairs it scores and whether its positives are
# the instance itself ("inst") or its positive set ("pos").
TERMS = {
    "x_inst": ("v2a", "a2v"),
    "w_inst": ("v2v", "a2a"),
    "x_pos": ("v2a", "a2v"),
    "w_pos": ("v2v", "a2a"),
}
# Queries per cma_topk call while mining: bounds each call's duration (progress, Ctrl-C).
_MINING_SLICE = 8192


class CMALoss(BankPairLoss):
    """Cross-modal agreement: instance discrimination with positive sets mined by agreement.

    Positive sets: P_i, the `num_positives` instances j != i whose memories agree most with i's
    (avidfast.ops.cma_topk; "consensus" = min of video and audio similarity), re-mined every
    `resample_every` calls of set_epoch (epochs of the caller). Each step draws `num_negatives` (K)
    negatives per row uniformly from all instances but P_i and i itself (the reference excludes
    P_i only; docs/method.md), and combines four terms, each the mean of its two directions, with
    weights normalised to sum 1:
      x_inst: v_i vs the audio bank and a_i vs the video bank, positive the instance itself, K negatives;
      w_inst: v_i vs the video bank and a_i vs the audio bank, positive the instance itself, K negatives;
      x_pos:  cross-modal, positives P_i (their NCE terms averaged), all K negatives;
      w_pos:  within-modal, positives P_i, the first K_w negatives (the paper: V[p] for p in P_i).
    The defaults (x_inst = w_pos = 1) are the paper's 0.5 / 0.5 mix. Partition constant: with
    ``partition="shared"`` (default, the reference's) one Z serves every term: the AVID stage's
    (from_avid), or else estimated on the first step from the first weighted term's first
    direction (x_inst: v2a, w_inst: v2v, x_pos: v2a, w_pos: v2v over the first K_w negatives).
    Banks, Z and the step are updated as in AVID, only when finite (``non_finite``, ``commit``:
    see AVIDLoss).

    Args:
        num_items, dim, num_negatives, temperature, momentum, bank_dtype, seed: as AVIDLoss.
        num_negatives_within: K_w, negatives of the within-modal positive-set term w_pos (a
            prefix of the K).
        num_positives: k, the size of each positive set.
        agreement: "consensus", "union", "video" or "audio".
        resample_every: set_epoch calls (epochs) between re-minings of the positive sets (the
            trainer maps the config's reference epochs onto its own; docs/method.md).
        x_inst, w_inst, x_pos, w_pos: term weights (normalised to sum 1; zero drops a term).
        precision: cma_topk's precision for mining ("highest", or "high" to allow TF32 on CUDA).
        non_finite: "raise" or "skip" (see AVIDLoss).
        partition: "shared" (one Z for every term) or "per_pair" (see BankPairLoss).

    Buffers: those of BankPairLoss, plus positives (N, k) int64, each row sorted ascending
    (-1 until mined) and positives_epoch (int64, the epoch they were mined at, -1 before).
    """

    def __init__(
        self,
        num_items: int,
        dim: int = 128,
        num_negatives: int = 1024,
        num_negatives_within: int = 64,
        num_positives: int = 32,
        agreement: str = "consensus",
        temperature: float = 0.07,
        momentum: float = 0.5,
        resample_every: int = 10,
        x_inst: float = 1.0,
        w_inst: float = 0.0,
        x_pos: float = 0.0,
        w_pos: float = 1.0,
        seed: int = 0,
        bank_dtype: torch.dtype = torch.float32,
        precision: str = "highest",
        non_finite: str = "raise",
        partition: str = "shared",
    ):
        if agreement not in AGREEMENTS:
            raise ValueError(f"agreement must be one of {AGREEMENTS}, got {agreement!r}")
        if not isinstance(num_positives, int) or not 1 <= num_positives < num_items - 1:
            raise ValueError(f"num_positives must be an int in [1, {num_items - 2}], got {num_positives!r}")
        if not isinstance(num_negatives, int) or num_negatives >= num_items - num_positives - 1:
            raise ValueError(
                f"num_negatives must be smaller than num_items - num_positives - 1 = "
                f"{num_items - num_positives - 1}, got {num_negatives!r}"
            )
        if not isinstance(num_negatives_within, int) or not 1 <= num_negatives_within <= num_negatives:
            raise ValueError(
                f"num_negatives_within must be an int in [1, num_negatives = {num_negatives}], "
                f"got {num_negatives_within!r}"
            )
        if not isinstance(resample_every, int) or resample_every < 1:
            raise ValueError(f"resample_every must be a positive int, got {resample_every!r}")
        weights = {"x_inst": x_inst, "w_inst": w_inst, "x_pos": x_pos, "w_pos": w_pos}
        if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"term weights must be finite, >= 0 and not all zero, got {weights}")
        if precision not in ("highest", "high"):
            raise ValueError(f"precision must be 'highest' or 'high', got {precision!r}")
        super().__init__(num_items, dim, num_negatives, temperature, momentum, bank_dtype, seed, non_finite,
                         partition)
        total = sum(weights.values())
        self.weights = {name: w / total for name, w in weights.items() if w > 0}
        self.num_negatives_within = num_negatives_within
        self.num_positives = num_positives
        self.agreement = agreement
        self.resample_every = resample_every
        self.precision = precision
        self.register_buffer("positives", torch.full((num_items, num_positives), -1, dtype=torch.int64))
        self.register_buffer("positives_epoch", torch.tensor(-1, dtype=torch.int64))
        self._mined = False  # known to hold mined positives (avoids a device sync per step)
        self.register_load_state_dict_post_hook(_forget_mined_flag)

    @classmethod
    def from_avid(cls, avid: Union[AVIDLoss, Mapping[str, torch.Tensor]], **kwargs) -> "CMALoss":
        """A CMALoss starting from an AVID stage: its banks, partition estimates Z and step.

        With partition="shared", Z is the mean of the AVID stage's estimated constants, the rule
        the reference applies to its checkpoints, so an avidfast AVID checkpoint and a released
        reference one (avidfast.checkpoints.reference) start CMA the same way.

        Args:
            avid: an AVIDLoss, or its state_dict (e.g. checkpoint["criterion"]).
            **kwargs: CMALoss arguments; num_items and dim come from the banks, and with an
                AVIDLoss its temperature, momentum, seed, non_finite and partition are the defaults.
        """
        if isinstance(avid, AVIDLoss):
            state = avid.state_dict()
            for name in ("temperature", "momentum", "seed", "non_finite"):
                kwargs.setdefault(name, getattr(avid, name))
            kwargs.setdefault("partition", avid.partition_mode)
        else:
            state = dict(avid)
        missing = [key for key in ("video_memory.memory", "audio_memory.memory", "Z", "step") if key not in state]
        if missing:
            raise ValueError(f"not an AVIDLoss state_dict: missing {missing}")
        video = state["video_memory.memory"]
        kwargs.setdefault("bank_dtype", video.dtype)
        cma = cls(video.shape[0], video.shape[1], **kwargs)
        own = cma.state_dict()
        own.update({key: state[key] for key in ("video_memory.memory", "audio_memory.memory", "Z", "step")})
        cma.load_state_dict(own)
        return cma.to(video.device)

    @torch.no_grad()
    def mine_positives(self, epoch: Optional[int] = None, progress: bool = True) -> None:
        """Recomputes every instance's positive set from the current banks.

        With torch.distributed initialised, rank r mines the r-th contiguous slice of the
        instances and the slices are all-gathered, so every rank ends with the same sets.
        A progress bar shows on rank 0 (mining takes minutes at AudioSet scale on a CPU).
        """
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
        per_rank = -(-self.num_items // world)
        start, stop = min(rank * per_rank, self.num_items), min((rank + 1) * per_rank, self.num_items)
        device = self.video_memory.memory.device
        slices = range(start, stop, _MINING_SLICE)
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=stop - start, desc=f"mining positives ({self.agreement}, k={self.num_positives})",
                       unit="query", dynamic_ncols=True)
        parts = []
        for first in slices:
            queries = torch.arange(first, min(first + _MINING_SLICE, stop), device=device)
            _, indices = cma_topk(self.video_memory.memory, self.audio_memory.memory, self.num_positives,
                                  self.agreement, queries, precision=self.precision)
            parts.append(sorted_positives(indices))
            if bar is not None:
                bar.update(len(queries))
        if bar is not None:
            bar.close()
        local = torch.cat(parts) if parts else torch.empty((0, self.num_positives), dtype=torch.int64, device=device)
        gathered = BatchLayout.exchange(local.shape[0], device).all_gather([local])[0]
        self.positives.copy_(gathered)
        self.positives_epoch.fill_(-1 if epoch is None else epoch)
        self._mined = True

    def set_epoch(self, epoch: int, progress: bool = True) -> None:
        """Call at the start of every epoch: re-mines when epoch is a multiple of resample_every
        (unless already mined at that epoch, e.g. after resuming) or when never mined."""
        mined_at = int(self.positives_epoch)
        never = bool((self.positives < 0).any())
        if never or (epoch % self.resample_every == 0 and mined_at != epoch):
            self.mine_positives(epoch, progress)

    def forward(
        self, video_emb: torch.Tensor, audio_emb: torch.Tensor, index: torch.Tensor, *, commit: bool = True
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of one batch and bank update; same contract as AVIDLoss.forward (commit too).

        logs maps "loss" and "loss/<term>" (x_inst, w_inst, x_pos, w_pos with weight > 0).
        """
        self.check_nothing_pending()
        embeddings = self.normalized_batch(video_emb, audio_emb, index)
        if not self._mined:
            if bool((self.positives < 0).any()):
                raise RuntimeError(
                    "CMALoss has no positive sets yet: call mine_positives() or set_epoch(epoch) "
                    "before the first forward"
                )
            self._mined = True
        positives = self.positives[index]
        layout = BatchLayout.exchange(index.shape[0], index.device)
        negatives = sample_negatives(
            index, self.num_items, self.num_negatives, self.seed, self.step, positives, row_offset=layout.offset
        )
        scored = {  # each term's positives and negatives
            "x_inst": (index, negatives),
            "w_inst": (index, negatives),
            "x_pos": (positives, negatives),
            "w_pos": (positives, negatives[:, : self.num_negatives_within]),
        }
        partitions = self.estimate_partitions(
            [(pair, scored[name][1]) for name in self.weights for pair in TERMS[name]], embeddings)
        terms = {}
        for name, weight in self.weights.items():
            pos, neg = scored[name]
            directions = [self.pair_loss(pair, embeddings, pos, neg, partitions) for pair in TERMS[name]]
            terms[name] = (weight, 0.5 * (directions[0] + directions[1]))
        loss, logs = weighted_terms(terms)
        return self.stage(loss, logs, layout, index, embeddings, partitions, commit)

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name}={w:.3g}" for name, w in self.weights.items())
        return (
            f"num_items={self.num_items}, dim={self.dim}, num_negatives={self.num_negatives}, "
            f"num_negatives_within={self.num_negatives_within}, num_positives={self.num_positives}, "
            f"agreement={self.agreement}, resample_every={self.resample_every}, {weights}, "
            f"temperature={self.temperature}, momentum={self.momentum}, partition={self.partition_mode}, "
            f"seed={self.seed}"
        )


def _forget_mined_flag(module: CMALoss, incompatible_keys) -> None:
    module._mined = False
