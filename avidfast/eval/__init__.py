"""Evaluation of learned representations (the protocols of the paper's supplement, and more).

- features.py: frozen-encoder feature extraction per block (max-pooled to (N, C)) and video-level
  aggregation of clip scores
- linear_probe.py: linear classifiers per block on cached features (clip / video top-1)
- linear_protocol.py: `avidfast eval linear`, the Table 1 protocol (probes trained on augmented clips)
- memory_probe.py: linear classifiers on memory-bank rows, random 70/30 splits (Table 2)
- finetune.py: `avidfast eval finetune`, the whole video network (Table 4 UCF / HMDB rows)
- retrieval.py: cross-modal recall@k and weighted k-NN from the embeddings
- config.py / data.py / run.py: protocol configs, labelled loaders, run folders (checkpoints are
  loaded by avidfast.checkpoints.pretrained: avidfast or reference, --random-init)
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
