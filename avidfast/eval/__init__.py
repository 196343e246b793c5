"""Evaluation of learned representations (the protocols of the paper's supplement).

- features.py: frozen-encoder feature extraction per block (max-pooled to (N, C)) over an
  evaluation loader, and video-level aggregation of clip scores
- linear_probe.py: a linear classifier per block, trained together, clip- and video-level top-1
  (supplement Table 1)
- memory_probe.py: linear classifiers on memory-bank rows (video, audio, concatenated), random
  70/30 splits repeated, mean +- std (supplement Table 2)
"""
from avidfast.eval.features import FeatureSet, extract_features, video_level, video_level_accuracy
from avidfast.eval.linear_probe import LinearProbe, ProbeResult, train_linear_probe
from avidfast.eval.memory_probe import MemoryProbeResult, memory_probe

__all__ = [
    "FeatureSet",
    "LinearProbe",
    "MemoryProbeResult",
    "ProbeResult",
    "extract_features",
    "memory_probe",
    "train_linear_probe",
    "video_level",
    "video_level_accuracy",
]
