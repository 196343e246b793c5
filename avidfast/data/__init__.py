"""Data: manifests, offline preparation, pre-processing and the two loaders.

- manifest.py: the CSV of clips (one row = one memory slot) and its metadata columns
- splits.py: UCF-101 / HMDB-51 split files, Kinetics and AudioSet CSVs -> manifest rows
- probe.py: the one prober (what a file holds, its durations, whether it is usable), for every reader
- prepare/: ``avidfast prepare`` (probe, reject with reasons, extract audio, transcode), one module per
  job: options, discovery, records, pool, writers
- audio.py / video.py: the paper's pre-processing (spectrogram presets, jitter, crops, colour)
- stats.py: ``avidfast stats`` (per-bin spectrogram mean/std for Z-normalisation)
- sampling.py: epoch order, per-rank sharding, per-sample random streams (shared by both loaders)
- cpu_pipeline.py: Dataset + DataLoader workers with bad-sample accounting
- dali_pipeline.py: the NVIDIA DALI pipeline (GPU decode; CPU mode on VP9 + WAV)
- synthetic.py: the learnable synthetic demo set
"""
