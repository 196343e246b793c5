"""Training: the loop with AMP / DDP / resume (loop.py), the training step (step.py), the metrics
sink (metrics.py), run folders with provenance and logs (run_folder.py).
Checkpoints and model building: avidfast.checkpoints."""
