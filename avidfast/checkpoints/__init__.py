"""Checkpoints and model building, below training and evaluation.

- store.py: avidfast checkpoints on disk: the one atomic save, the one safe load (weights_only,
  with an explicit ``trust`` for a full unpickle), RNG state, run-folder names
- reference.py: the reference-format reader (the paper's released ``.pth.tar`` files)
- build.py: the model and criterion of a training config; starting them from a reference file
- pretrained.py: any checkpoint (avidfast or reference) as a model and banks for evaluation
"""
