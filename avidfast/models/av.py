"""AVModel: video and audio encoders with their projection heads -> unit-norm embeddings."""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from avidfast.models.audio import AUDIO_PRESETS, AudioEncoder
from avidfast.models.heads import ProjectionHead
from avidfast.models.video import VIDEO_PRESETS, VideoEncoder

PRESETS = ("table5", "table6")


def preset_input_shapes(preset: str) -> Dict[str, Tuple[int, ...]]:
    """Per-sample input shapes of a preset: {"video": (3, T, H, W), "audio": (1, F, T)}.

    table5: video (3, 16, 112, 112), audio (1, 129, 100); table6: (3, 8, 224, 224), (1, 257, 200).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    t, s = VIDEO_PRESETS[preset][2]
    f, ta = AUDIO_PRESETS[preset][1]
    return {"video": (3, t, s, s), "audio": (1, f, ta)}


class AVModel(nn.Module):
    """Audio-visual model: forward(video, audio) -> (v, a), each (B, embed_dim) and L2-normalised.

    video (B, 3, T, H, W) -> `video` encoder (B, video.out_dim) -> `video_head` -> normalise;
    audio (B, 1, F, T) -> `audio` encoder (B, audio.out_dim) -> `audio_head` -> normalise.
    The heads return raw projections; normalisation happens here (the losses normalise again,
    which is harmless). The encoders check their input's shape (a ValueError naming the expected
    layout): dims and channels always, audio frequency bins when built with an audio_preset.

    Args:
        video, audio: the encoders (anything with `out_dim` and forward(x) -> (B, out_dim)).
        embed_dim: embedding size (128, the memory-bank dimension).
        hidden: hidden size of the heads; None = the encoder's out_dim (512 at width 64, as in
            the tables' fc1/fc2).
        head_layers: linear layers per head (3: fc1..fc3 of the tables; 1: a linear projection).
        head_input_norm: a BatchNorm1d at the input of each head (not in the paper; see ProjectionHead).
    """

    def __init__(self, video: nn.Module, audio: nn.Module, embed_dim: int = 128,
                 hidden: Optional[int] = None, head_layers: int = 3, head_input_norm: bool = False):
        super().__init__()
        self.video = video
        self.audio = audio
        self.embed_dim = embed_dim
        self.video_head = ProjectionHead(video.out_dim, hidden or video.out_dim, embed_dim, head_layers,
                                         head_input_norm)
        self.audio_head = ProjectionHead(audio.out_dim, hidden or audio.out_dim, embed_dim, head_layers,
                                         head_input_norm)

    @classmethod
    def from_preset(cls, preset: str = "table5", width: int = 64, embed_dim: int = 128,
                    hidden: Optional[int] = None, head_layers: int = 3, head_input_norm: bool = False,
                    video_kwargs: Optional[Dict[str, Any]] = None,
                    audio_kwargs: Optional[Dict[str, Any]] = None,
                    audio_preset: Optional[str] = None) -> "AVModel":
        """The networks of Table 5 ("table5") or Table 6 ("table6") at a given channel width.

        video_kwargs / audio_kwargs go to `VideoEncoder` / `AudioEncoder` (e.g. mid_channels,
        residual). audio_preset: the spectrogram preset the audio comes from (table5, table6 or
        reference; training passes data.audio.preset): forward then refuses a spectrogram whose
        dim 2 does not hold that preset's frequency bins, e.g. a transposed (B, 1, T, F) one.
        None (the default) checks dims and channels only (see `AudioEncoder`).
        """
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
        audio_kwargs = dict(audio_kwargs or {})
        audio_kwargs.setdefault("audio_preset", audio_preset)
        video = VideoEncoder(preset, width, **(video_kwargs or {}))
        audio = AudioEncoder(preset, width, **audio_kwargs)
        return cls(video, audio, embed_dim, hidden, head_layers, head_input_norm)

    def embed_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, embed_dim), unit L2 norm."""
        return F.normalize(self.video_head(self.video(video)), dim=1)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 1, F, T) -> (B, embed_dim), unit L2 norm."""
        return F.normalize(self.audio_head(self.audio(audio)), dim=1)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W), (B, 1, F, T) -> v (B, embed_dim), a (B, embed_dim), both unit-norm."""
        return self.embed_video(video), self.embed_audio(audio)
