"""AVIDLoss: audio-visual instance discrimination against memory banks (docs/method.md, AVID loss)."""
from typing import Dict, Tuple

import torch

from avidfast.distributed import BatchLayout
from avidfast.losses.bank_pair import BankPairLoss, weighted_terms
from avidfast.ops import sample_negatives

# The pairs of each mode (see bank_pair.PAIRS), weighted equally.
MODES = {
    "cross": ("v2a", "a2v"),
    "self": ("v2v", "a2a"),
    "joint": ("v2a", "a2v", "v2v", "a2a"),
}


class AVIDLoss(BankPairLoss):
    """Cross-, self- or joint-AVID loss with video and audio memory banks.

    Each step: L2-normalise both embeddings; draw `num_negatives` indices per row uniformly from
    all instances but the row's own (seeded by (seed, step), one draw shared by all terms); on
    the first step estimate the partition constant Z as the mean of exp(negative scores) over all
    ranks (``partition="shared"``, the reference's: one Z from the first pair of the mode, v2a or
    v2v, used by every pair; ``"per_pair"``: one estimate per pair); compute each pair's NCE (positive: the row's own slot) and average the
    pairs with equal weights; then, without gradient, update both banks with (index, v, a)
    all-gathered from every rank, in rank order (repeated indices: batch order), store the new Z
    and advance the step.

    Non-finite batches: the update, the new Z and the step are applied only when the loss (on
    every rank), the new Z and the gathered embeddings are finite, so a NaN batch never reaches
    the banks or Z. Otherwise ``non_finite="raise"`` (default) raises
    avidfast.errors.NonFiniteError and ``"skip"`` returns the non-finite loss unapplied and counts
    the batch in ``skipped_updates`` (do not step an optimiser on it). ``forward(..., commit=False)``
    leaves the update pending until :meth:`commit` (or :meth:`discard`), e.g. after checking the
    gradients too, as avidfast's training step does; see BankPairLoss.

    Args:
        num_items: N, the number of training instances (memory slots).
        dim: embedding size D of both modalities.
        num_negatives: K negatives per row.
        temperature: T of the scores <x, m> / T.
        momentum: m of the bank update normalize(m * row + (1 - m) * x).
        mode: "cross" (video vs audio bank and audio vs video bank; the paper's best),
            "self" (each modality vs its own bank) or "joint" (all four pairs).
        bank_dtype: storage dtype of the banks (float32, bfloat16, float16).
        seed: seeds the initial banks and the negative draws.
        non_finite: "raise" or "skip": what forward does with a batch whose loss, first Z
            estimate or embeddings are NaN or infinite (nothing is written either way).
        partition: "shared" (one Z for every pair) or "per_pair"; see BankPairLoss.

    Buffers: see BankPairLoss (banks, Z (one entry per pair), step).
    """

    def __init__(
        self,
        num_items: int,
        dim: int = 128,
        num_negatives: int = 1024,
        temperature: float = 0.07,
        momentum: float = 0.5,
        mode: str = "cross",
        bank_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        non_finite: str = "raise",
        partition: str = "shared",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        super().__init__(num_items, dim, num_negatives, temperature, momentum, bank_dtype, seed, non_finite,
                         partition)
        self.mode = mode
        self.pairs = MODES[mode]

    def forward(
        self, video_emb: torch.Tensor, audio_emb: torch.Tensor, index: torch.Tensor, *, commit: bool = True
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of one batch and bank update.

        Args:
            video_emb: (B, D) video embeddings (normalised here), any float dtype.
            audio_emb: (B, D) audio embeddings.
            index: (B,) int64 memory slot of each row (its video's index).
            commit: apply the bank update, new Z and step now (when finite); False leaves them
                pending until commit() or discard().

        Returns:
            (loss, logs): scalar float32 loss (mean over the local batch); logs maps "loss" and
            "loss/<pair>" to detached scalars.
        """
        self.check_nothing_pending()
        embeddings = self.normalized_batch(video_emb, audio_emb, index)
        layout = BatchLayout.exchange(index.shape[0], index.device)
        negatives = sample_negatives(
            index, self.num_items, self.num_negatives, self.seed, self.step, row_offset=layout.offset
        )
        partitions = self.estimate_partitions([(pair, negatives) for pair in self.pairs], embeddings)
        weight = 1.0 / len(self.pairs)
        terms = {pair: (weight, self.pair_loss(pair, embeddings, index, negatives, partitions)) for pair in self.pairs}
        loss, logs = weighted_terms(terms)
        return self.stage(loss, logs, layout, index, embeddings, partitions, commit)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, num_items={self.num_items}, dim={self.dim}, "
            f"num_negatives={self.num_negatives}, temperature={self.temperature}, "
            f"momentum={self.momentum}, partition={self.partition_mode}, seed={self.seed}"
        )
