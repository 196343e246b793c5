"""Evaluation of learned representations (the protocols of the paper's supplement, and more).

Every protocol has a library entry point that the command line only parses arguments for:

- ``run_config_protocol(cfg, checkpoint)`` (run.py): `avidfast eval linear` (linear_protocol.py, the
  Table 1 protocol: probes trained on augmented clips) and `avidfast eval finetune` (finetune.py, the
  whole video network, Table 4 UCF / HMDB rows), from an EvalConfig
- ``run_memory_probe(MemoryProbeSettings(...))`` (memory_protocol.py): `avidfast eval memory`, linear
  classifiers on memory-bank rows, random 70/30 splits (Table 2)
- ``run_retrieval(RetrievalSettings(...))`` (retrieval_protocol.py): `avidfast eval retrieval`,
  cross-modal recall@k and weighted k-NN from the embeddings

and the pieces they are built from:

- features.py: frozen-encoder feature extraction per block (max-pooled to (N, C)), video-level
  aggregation of clip scores and the one video-level accuracy (``video_level_accuracy``)
- linear_probe.py: linear classifiers per block on cached features (clip / video top-1)
- memory_probe.py: the memory probe on bank tensors; retrieval.py: recall@k, class-level
  precision@1 and k-NN on embeddings; confidence.py: Wilson intervals of the fractions
- config.py / data.py / run.py: protocol configs, labelled loaders and the one stratified split, run
  folders (checkpoints are loaded by avidfast.checkpoints.pretrained: avidfast or reference,
  --random-init)
"""
from avidfast.eval.features import FeatureSet, extract_features, video_level, video_level_accuracy
from avidfast.eval.linear_probe import LinearProbe, LinearProbeResult, train_linear_probe
from avidfast.eval.memory_probe import MemoryProbeResult, memory_probe
from avidfast.eval.memory_protocol import MemoryProbeSettings, run_memory_probe
from avidfast.eval.retrieval_protocol import RetrievalSettings, run_retrieval
from avidfast.eval.run import run_config_protocol

__all__ = [
    "FeatureSet",
    "LinearProbe",
    "LinearProbeResult",
    "MemoryProbeResult",
    "MemoryProbeSettings",
    "RetrievalSettings",
    "extract_features",
    "memory_probe",
    "run_config_protocol",
    "run_memory_probe",
    "run_retrieval",
    "train_linear_probe",
    "video_level",
    "video_level_accuracy",
]
