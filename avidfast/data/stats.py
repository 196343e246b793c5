"""Per-frequency mean and std of the dB spectrogram over a training set (`avidfast stats`)."""
import logging
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Tuple

import torch

from avidfast.data import audio as audio_ops
from avidfast.data.manifest import Manifest
from avidfast.data.probe import probe_header

log = logging.getLogger(__name__)


def _file_stats(task: Tuple[str, Optional[float], str, float]) -> Tuple[str, Optional[audio_ops.RunningStats], str]:
    """Accumulates the dB spectrogram of up to max_seconds of one file's audio (``duration``: the
    manifest's ``audio_duration``, else the audio stream's by the rule of :mod:`avidfast.data.probe`)."""
    path, duration, preset_name, max_seconds = task
    preset = audio_ops.get_preset(preset_name)
    try:
        if duration is None:
            duration = probe_header(path, "audio").audio_duration or 0.0
        seconds = min(duration, max_seconds)
        if seconds * preset.sample_rate <= preset.fft_size:
            raise ValueError(f"audio of {seconds:.2f} s is too short for a spectrogram")
        wave = audio_ops.decode_audio(path, 0.0, seconds, preset.sample_rate)
        running = audio_ops.RunningStats(preset.bins)
        running.add(audio_ops.db_spectrogram(wave, preset))
        return path, running, ""
    except Exception as error:  # noqa: BLE001 - a bad file is reported, not fatal
        return path, None, f"{type(error).__name__}: {error}"


def default_stats_path(manifest_path: str, preset_name: str) -> str:
    """Where `avidfast stats` writes, and training looks for, the statistics of a manifest:
    the manifest's path without its extension + ``.<preset>-stats.npz``."""
    return f"{manifest_path.rsplit('.', 1)[0]}.{preset_name}-stats.npz"


def compute_stats(
    manifest: Manifest,
    preset: audio_ops.SpectrogramPreset,
    *,
    workers: int = 2,
    max_seconds: float = 30.0,
    progress: bool = True,
) -> Tuple[audio_ops.SpectrogramStats, int]:
    """Mean/std of every (bin, frame) of the dB spectrogram of the first max_seconds of each
    row's audio (the extracted file when the manifest has one), frames weighted equally. A
    preset's dB floor (``reference``: top_db) is taken below the maximum of that whole read.

    Returns (stats, number of files that could not be read); unreadable files are logged.
    """
    from tqdm import tqdm

    tasks = [(manifest.audio_path(i), manifest.rows[i].get("audio_duration"), preset.name, max_seconds)
             for i in range(len(manifest))]
    total = audio_ops.RunningStats(preset.bins)
    failed = 0
    if workers > 0:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,))
        results = pool.map(_file_stats, tasks, chunksize=4)
    else:
        pool, results = None, map(_file_stats, tasks)
    try:
        for path, running, error in tqdm(results, total=len(tasks), desc="spectrogram stats", disable=not progress):
            if running is None:
                failed += 1
                log.warning("stats: skipped %s: %s", path, error)
            else:
                total.merge(running)
    finally:
        if pool is not None:
            pool.shutdown()
    return total.result(preset.name), failed
