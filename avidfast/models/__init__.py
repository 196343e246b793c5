"""Encoders of the supplement's Tables 5 and 6, projection heads and the audio-visual wrapper.

    VideoEncoder   R(2+1)D: (B, 3, T, H, W) -> (B, 8 * width)          avidfast.models.video
    AudioEncoder   Conv2D over log-spectrograms: (B, 1, F, T) -> (B, 8 * width)  .audio
    ProjectionHead fc1..fc3 MLP: (B, 8 * width) -> (B, 128), raw        .heads
    AVModel        both encoders + heads -> unit-norm (v, a) embeddings .av
"""
from avidfast.models.audio import AudioEncoder
from avidfast.models.av import AVModel, preset_input_shapes
from avidfast.models.heads import ProjectionHead
from avidfast.models.video import VideoEncoder, matched_mid_channels

__all__ = ["AVModel", "AudioEncoder", "ProjectionHead", "VideoEncoder", "matched_mid_channels",
           "preset_input_shapes"]
