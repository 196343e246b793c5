"""The spectrogram statistics a training run normalises with: given, or computed on first use."""
import logging
import os
import tempfile
from typing import Optional

from avidfast.checkpoints.shared import read_on_every_rank
from avidfast.config import Config
from avidfast.data.audio import SpectrogramStats, get_preset
from avidfast.data.manifest import Manifest
from avidfast.data.stats import compute_stats, default_stats_path
from avidfast.distributed import barrier, is_distributed
from avidfast.errors import TrainingError
from avidfast.files import atomic_write

log = logging.getLogger(__name__)


def training_stats_path(cfg: Config, manifest: Manifest, rank: int) -> Optional[str]:
    """The .npz of per-frequency spectrogram statistics the run Z-normalises with, or None when
    cfg.data.audio.normalize is false (un-normalised dB values, as the config says).

    data.audio.stats set: that file (checked against the preset). Unset: the manifest's cache
    (:func:`avidfast.data.stats.default_stats_path`, the file `avidfast stats` writes by default),
    reused when present, else computed now by rank 0 with a progress bar and written there
    atomically while the other ranks wait. No shared file system is assumed: a rank whose node has
    no copy of rank 0's file (or another one) receives its bytes over the process group and writes
    them to the same path on its own disk. TrainingError, naming the command that computes the
    file, when the cache cannot be written.
    """
    audio = cfg.data.audio
    preset = get_preset(audio.preset)
    if not audio.normalize:
        log.warning("data.audio.normalize is false: training on un-normalised dB spectrograms")
        return None
    if audio.stats:
        SpectrogramStats.load(audio.stats, preset)
        return audio.stats
    path = default_stats_path(cfg.data.manifest, preset.name)
    if rank == 0 and not os.path.isfile(path):
        _compute_cache(cfg, manifest, path)
    if is_distributed():
        barrier()
        read_on_every_rank(path, lambda data: _keep_copy(path, data), "data.audio.stats")
    SpectrogramStats.load(path, preset)
    return path


def _keep_copy(path: str, data: Optional[bytes]) -> None:
    """Writes rank 0's statistics (``data``, when this rank's copy was missing or differed) to ``path``."""
    if data is not None:
        atomic_write(path, lambda f: f.write(data))


def _compute_cache(cfg: Config, manifest: Manifest, path: str) -> None:
    preset = get_preset(cfg.data.audio.preset)
    command = (f"`avidfast stats {cfg.data.manifest} --audio-preset {preset.name} --out FILE`, then "
               f"--set data.audio.stats=FILE")
    if os.path.exists(path) or not _writable(os.path.dirname(os.path.abspath(path))):
        raise TrainingError(f"data.audio.stats is unset and its cache {path} cannot be written: compute the "
                            f"statistics with {command}")
    log.warning("data.audio.stats is unset: computing the spectrogram statistics of %s into %s (once; reused "
                "after)", cfg.data.manifest, path)
    try:
        stats, failed = compute_stats(manifest, preset, workers=cfg.data.workers, progress=cfg.train.progress)
    except ValueError as error:
        raise TrainingError(f"data.audio.stats: the statistics of {cfg.data.manifest} cannot be computed "
                            f"({error}); compute them with {command}") from None
    if failed:
        log.warning("spectrogram statistics: %d of %d files unreadable (see the warnings above)", failed, len(manifest))
    try:
        stats.save(path)
    except OSError as error:
        raise TrainingError(f"data.audio.stats: the cache {path} cannot be written ({error.strerror or error}); "
                            f"compute the statistics with {command}") from None


def _writable(folder: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
