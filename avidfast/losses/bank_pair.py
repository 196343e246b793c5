"""The state and steps that AVIDLoss and CMALoss share: two banks, partition estimates, a step."""
from typing import Dict, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.distributed import BatchLayout, all_reduce_sum
from avidfast.losses.memory_bank import MemoryBank

# A pair scores one modality's embeddings ("v" video, "a" audio) against one modality's bank:
# "v2a" = video embeddings against the audio bank. Each pair has its own partition estimate Z.
PAIRS = ("v2a", "a2v", "v2v", "a2a")


class BankPairLoss(nn.Module):
    """Video and audio memory banks with per-pair partition estimates and a step counter.

    Buffers (in state_dict, so that a checkpoint resumes exactly): video_memory.memory and
    audio_memory.memory (N, D); Z (4,), one per pair of PAIRS, <= 0 until estimated; step, an
    int64 scalar that seeds each step's negative draws.
    """

    def __init__(self, num_items: int, dim: int, num_negatives: int, temperature: float,
                 momentum: float, bank_dtype: torch.dtype, seed: int):
        super().__init__()
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
    def estimate_partitions(self, pairs: Iterable[str], embeddings: Dict[str, torch.Tensor],
                            negatives: torch.Tensor) -> None:
        """Fixes Z of every pair in `pairs` not yet estimated: the mean of exp(negative scores),
        over all ranks (one all-reduce). Later calls leave estimated pairs untouched."""
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self._estimated]
        if not missing:
            return
        banks = self.banks()
        sums = [
            banks[pair[2]].scores(embeddings[pair[0]], negatives, self.temperature).exp().sum(dtype=torch.float64)
            for pair in missing
        ]
        count = torch.tensor(float(negatives.numel()), dtype=torch.float64, device=negatives.device)
        totals = all_reduce_sum(torch.stack(sums + [count]))
        for pair, total in zip(missing, totals[:-1]):
            self.Z[PAIRS.index(pair)] = total / totals[-1]
            self._estimated.add(pair)

    def pair_loss(self, pair: str, embeddings: Dict[str, torch.Tensor], pos_idx: torch.Tensor,
                  neg_idx: torch.Tensor) -> torch.Tensor:
        """NCE loss (mean over the batch) of `pair` with positives pos_idx and negatives neg_idx."""
        bank = self.banks()[pair[2]]
        return bank.nce_loss(embeddings[pair[0]], pos_idx, neg_idx, self.temperature, self.partition(pair))

    @torch.no_grad()
    def update_banks(self, layout: BatchLayout, index: torch.Tensor,
                     embeddings: Dict[str, torch.Tensor]) -> None:
        """Momentum update of both banks with (index, v, a) from every rank, in rank order, then
        advances the step."""
        all_index, all_video, all_audio = layout.all_gather([index, embeddings["v"], embeddings["a"]])
        self.video_memory.update_(all_index, all_video, self.momentum)
        self.audio_memory.update_(all_index, all_audio, self.momentum)
        self.step += 1


def weighted_terms(terms: Dict[str, Tuple[float, torch.Tensor]]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """sum_t w_t L_t over terms {name: (normalised weight, loss)}, and detached logs."""
    loss = torch.stack([weight * value for weight, value in terms.values()]).sum()
    logs = {f"loss/{name}": value.detach() for name, (_, value) in terms.items()}
    logs["loss"] = loss.detach()
    return loss, logs


def _refresh_estimated_pairs(module: BankPairLoss, incompatible_keys) -> None:
    module._estimated = {pair for pair, z in zip(PAIRS, module.Z.tolist()) if z > 0}
