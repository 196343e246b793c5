"""Training: configuration (config.py), the loop with AMP / DDP / resume (loop.py), checkpoints
(checkpoint.py), run folders with provenance and logs (run_folder.py), the CPU demo (demo.py)."""
