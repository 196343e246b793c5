"""AVIDLoss: audio-visual instance discrimination against memory banks (METHOD.md, AVID)."""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.distributed import BatchLayout, all_reduce_sum
from avidfast.losses.memory_bank import MemoryBank
from avidfast.ops import sample_negatives

# Each term scores one modality's embeddings ("v" video, "a" audio) against one modality's bank:
# "v2a" = video embeddings against the audio bank.
TERMS = {
    "cross": ("v2a", "a2v"),
    "self": ("v2v", "a2a"),
    "joint": ("v2a", "a2v", "v2v", "a2a"),
}


class AVIDLoss(nn.Module):
    """Cross-, self- or joint-AVID loss with video and audio memory banks.

    Each step: L2-normalise both embeddings; draw `num_negatives` indices per row uniformly from
    all instances but the row's own (seeded by (seed, step), one draw shared by all terms); on
    the first step fix each term's partition estimate Z as the mean of exp(negative scores)
    (over all ranks); compute each term's NCE (positive: the row's own slot) and average the
    terms with equal weights; then, without gradient, update both banks with (index, v, a)
    all-gathered from every rank, in rank order (repeated indices: batch order).

    Args:
        num_items: N, the number of training instances (memory slots).
        dim: embedding size D of both modalities.
        num_negatives: K negatives per row.
        temperature: T of the scores <x, m> / T.
        momentum: m of the bank update normalize(m * row + (1 - m) * x).
        mode: "cross" (video vs audio bank and audio vs video bank; the paper's best),
            "self" (each modality vs its own bank) or "joint" (all four terms).
        bank_dtype: storage dtype of the banks (float32, bfloat16, float16).
        seed: seeds the initial banks and the negative draws.

    Buffers (in state_dict, so a checkpoint resumes exactly): video_memory.memory,
    audio_memory.memory (N, D); Z (terms,), <= 0 until estimated; step, int64 scalar.
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
    ):
        super().__init__()
        if mode not in TERMS:
            raise ValueError(f"mode must be one of {sorted(TERMS)}, got {mode!r}")
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
        self.mode = mode
        self.seed = int(seed)
        self.terms = TERMS[mode]
        self.register_buffer("Z", torch.full((len(self.terms),), -1.0))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._partition_ready = False
        self.register_load_state_dict_post_hook(_refresh_partition_flag)

    def _check_batch(self, video_emb: torch.Tensor, audio_emb: torch.Tensor, index: torch.Tensor) -> None:
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

    def _banks(self) -> Dict[str, MemoryBank]:
        return {"v": self.video_memory, "a": self.audio_memory}

    @torch.no_grad()
    def _estimate_partition(self, embeddings: Dict[str, torch.Tensor], negatives: torch.Tensor) -> None:
        banks = self._banks()
        sums = [
            banks[term[2]].scores(embeddings[term[0]], negatives, self.temperature).exp().sum(dtype=torch.float64)
            for term in self.terms
        ]
        count = torch.tensor(float(negatives.numel()), dtype=torch.float64, device=negatives.device)
        totals = all_reduce_sum(torch.stack(sums + [count]))
        self.Z.copy_(totals[:-1] / totals[-1])
        self._partition_ready = True

    def forward(
        self, video_emb: torch.Tensor, audio_emb: torch.Tensor, index: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of one batch and bank update.

        Args:
            video_emb: (B, D) video embeddings (normalised here), any float dtype.
            audio_emb: (B, D) audio embeddings.
            index: (B,) int64 memory slot of each row (its video's index).

        Returns:
            (loss, logs): scalar float32 loss (mean over the local batch); logs maps "loss" and
            "loss/<term>" to detached scalars.
        """
        self._check_batch(video_emb, audio_emb, index)
        embeddings = {"v": F.normalize(video_emb, dim=1), "a": F.normalize(audio_emb, dim=1)}
        layout = BatchLayout.exchange(index.shape[0], index.device)
        negatives = sample_negatives(
            index, self.num_items, self.num_negatives, self.seed, self.step, row_offset=layout.offset
        )
        if not self._partition_ready:
            self._estimate_partition(embeddings, negatives)
        banks = self._banks()
        term_losses = {
            term: banks[term[2]].nce_loss(embeddings[term[0]], index, negatives, self.temperature, self.Z[t])
            for t, term in enumerate(self.terms)
        }
        loss = torch.stack(list(term_losses.values())).mean()

        all_index, all_video, all_audio = layout.all_gather([index, embeddings["v"], embeddings["a"]])
        self.video_memory.update_(all_index, all_video, self.momentum)
        self.audio_memory.update_(all_index, all_audio, self.momentum)
        self.step += 1

        logs = {f"loss/{term}": value.detach() for term, value in term_losses.items()}
        logs["loss"] = loss.detach()
        return loss, logs

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, num_items={self.num_items}, dim={self.dim}, "
            f"num_negatives={self.num_negatives}, temperature={self.temperature}, "
            f"momentum={self.momentum}, seed={self.seed}"
        )


def _refresh_partition_flag(module: AVIDLoss, incompatible_keys) -> None:
    module._partition_ready = bool((module.Z > 0).all())
