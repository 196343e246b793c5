"""``avidfast prepare``: probe a collection of videos, keep the usable ones, optionally re-encode.

Input (SRC): a manifest CSV (paths relative to its folder, or to ``root``) or a folder, searched
recursively: every file in it is probed (hidden files and folders, OUT when it lies inside SRC and
the output folders of earlier runs are left out, and the run says how many). Every source is
accounted for: a row of manifest.csv, or of rejected.csv with the reason ("not a media file",
"audio only", "no such file", "truncated: ...", ...); ``summary.total == kept + rejected``.

Output folder OUT:
  * ``manifest.csv``: one row per usable clip, in source order, with ``path``, ``label`` (and any
    other column of a source manifest) and the metadata columns
    (:data:`avidfast.data.manifest.METADATA_COLUMNS`). All paths are relative to OUT, so
    ``read_manifest("OUT/manifest.csv")`` works as is:
      - with ``transcode``: ``path`` is the re-encoded file, ``videos/<source path>.<mp4|webm>``;
      - without: ``path`` points at the source file itself (``../raw/a.mp4``-style; absolute only
        where no relative path exists, e.g. another drive);
      - with ``extract_audio``: ``audio_path`` is ``audio/<source path>.<wav|flac>``, 24 kHz mono
        16-bit, whose sample 0 is at the time of the video's first frame;
      - with ``video_only`` (sets for the video-only evaluation protocols: linear probe,
        fine-tuning): files without an audio stream are kept, and a ``has_audio`` column (1 / 0)
        records which rows have sound (a reader of audio refuses rows with 0).
    ``duration`` (s), ``fps``, ``width``, ``height`` describe the ``path`` file; ``sample_rate``
    (Hz) and ``channels`` the audio inside it (empty when a transcoded file carries none).
    ``<source path>`` mirrors the source tree: the path relative to the SRC folder (or manifest
    root) without its extension, plus ``_<ext>`` where two sources would otherwise collide; a
    manifest entry outside its root goes under ``_outside/<hash>/``.
  * ``rejected.csv``: ``path`` (relative to OUT, like above) and ``reason`` (one short line).
    When no clip is usable, neither file is written: :class:`PrepareError` gives the reasons.
  * with ``shards``: ``shards/`` holds the kept clips (the ``path`` file, the extracted audio and
    a JSON with memory slot, label and metadata per clip) as tar shards of about ``shard_bytes``
    and their ``index.npz`` (:mod:`avidfast.data.shards`), rewritten from manifest.csv by each run.
  * ``.prepare/``: one JSON record per source file (its probe and the outputs made from it) and
    the options of the last run. A rerun skips every file whose record matches the file's size and
    modification time and whose outputs exist and were made with the same options (outputs are
    written to a temporary name and renamed when complete, so an existing output is complete).
    manifest.csv and rejected.csv are written (atomically) only when a run ends; a run with other
    output options than the last removes them first. So a run stopped at any point, SIGKILL
    included, resumes without redoing finished files and never leaves a list naming a partial or
    outdated output.

Sources are only read, never written: OUT may not be the source folder, and no output path may
be a source file. An OUT already prepared from another source (or root) is refused rather than
having its manifest replaced. A folder SRC is searched without the output folders of earlier
prepare runs inside it (noted in ``summary.warnings``); a manifest SRC listing one file in two rows
gives two memory slots, which ``summary.warnings`` notes too. Work runs in ``workers`` spawned processes (0: in this process); a file that
hangs or crashes its worker is rejected with a reason instead of stopping the run.

Modules, one per job: ``options`` (what can be asked, :class:`PrepareError`), ``discovery``
(the source files and where their outputs go), ``records`` (per-file records, the probe and
output passes, the manifest rows), ``pool`` (the crash-tolerant worker processes), ``writers``
(the PyAV audio-extraction and re-encoding writers).
"""
import os
import sys
import time
from typing import Callable, Dict, List, Optional

from avidfast.data.manifest import Manifest, write_manifest
from avidfast.data.prepare.discovery import (
    VIDEO_EXTENSIONS, Entry, check_out, check_same_source, find_sources, output_stems, planned_outputs, relative,
    repeated_sources,
)
from avidfast.data.prepare.options import (
    AUDIO_FORMATS, OUTPUT_VERSION, STATE_DIR, TRANSCODES, PrepareError, check_arguments,
)
from avidfast.data.prepare.pool import WorkerPool
from avidfast.data.prepare.records import (
    PrepareSummary, manifest_columns, manifest_rows, probe_all, process_all, reason_kind, save_run,
    withdraw_outdated_lists,
)
from avidfast.data.prepare.writers import AUDIO_RATE
from avidfast.data.shards.index import INDEX_NAME
from avidfast.data.shards.writer import DEFAULT_SHARD_BYTES, write_shards

SHARDS_DIR = "shards"

__all__ = ["prepare", "PrepareError", "PrepareSummary", "reason_kind", "VIDEO_EXTENSIONS", "AUDIO_FORMATS",
           "TRANSCODES", "AUDIO_RATE", "STATE_DIR"]


def prepare(src: str, out_dir: str, *, root: Optional[str] = None, workers: int = 2,
            extract_audio: Optional[str] = None, transcode: Optional[str] = None, fps: int = 16,
            gop: int = 16, short_side: Optional[int] = None, min_seconds: float = 2.0, check: str = "fast",
            shards: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
            log: Optional[Callable[[str], None]] = None, video_only: bool = False) -> PrepareSummary:
    """Probes SRC, writes ``OUT/manifest.csv`` and ``OUT/rejected.csv``; see the module docstring.

    ``extract_audio``: None, "wav" or "flac" (24 kHz mono 16-bit). ``transcode``: None, "h264"
    (libx264 yuv420p in MP4 with AAC audio: for GPU decoding) or "vp9" (libvpx-vp9 realtime in
    WebM with Opus audio, or no audio when ``extract_audio`` is set: DALI's CPU backend decodes
    it). Transcoded video has a constant ``fps`` and a keyframe every ``gop`` frames, and even
    width and height (odd ones are scaled down by one pixel); ``short_side`` (pixels, with
    ``transcode``) scales it so its short side is that long (never enlarged; e.g. 128 for 112^2
    crops): decoding and cropping such copies is much cheaper than the originals. ``min_seconds``:
    shorter clips are rejected. ``check``: how hard each file is probed, see :mod:`avidfast.data.probe`.
    ``video_only``: keep files without an audio stream (module docstring; not with ``extract_audio`` /
    ``transcode``). ``shards``: also write ``OUT/shards`` (tar shards of at most ``shard_bytes``
    bytes, 1 GiB by default).
    ``log`` receives one-line notes and warnings (default: stderr when ``progress``); the
    warnings are also in ``summary.warnings``.
    Raises :class:`PrepareError` for bad arguments or inputs, and when no clip is usable (with the
    reasons; manifest.csv and rejected.csv are then left as they were).
    """
    started = time.monotonic()
    check_arguments(extract_audio=extract_audio, transcode=transcode, check=check, fps=fps, gop=gop,
                    workers=workers, min_seconds=min_seconds, short_side=short_side, video_only=video_only)
    if shard_bytes < 1:
        raise PrepareError(f"shard_bytes must be >= 1, got {shard_bytes}")
    if log is None:
        log = (lambda message: print(message, file=sys.stderr, flush=True)) if progress else (lambda message: None)

    out = os.path.abspath(out_dir)
    skipped: List[str] = []
    hidden: List[str] = []
    entries, source_root, protected = find_sources(src, root, out, skipped, hidden)
    check_out(out, source_root, protected)
    check_same_source(out, src, source_root)
    warnings = [f"warning: left out {relative(folder, os.path.abspath(src))}/ of {src}: an output folder of "
                "avidfast prepare, not sources" for folder in skipped]
    if hidden:
        shown = ", ".join(relative(path, os.path.abspath(src)) for path in hidden[:3])
        warnings.append(f"note: left out {len(hidden)} hidden file(s)/folder(s) of {src} (name starting with '.': "
                        f"{shown}{', ...' if len(hidden) > 3 else ''})")
    repeats = repeated_sources(entries)
    if repeats:
        shown = ", ".join(f"line {row + 1} = line {first + 1}: {key}" for row, first, key in repeats[:3])
        warnings.append(f"warning: {len(repeats)} row(s) of {src} repeat a file an earlier row lists ({shown}"
                        f"{', ...' if len(repeats) > 3 else ''}); each row is its own memory slot, so the file "
                        "is two instances: remove the repeats unless that is intended")
    for warning in warnings:
        log(warning)
    unique: Dict[str, Entry] = {}
    for entry in entries:
        unique.setdefault(entry.source, entry)
    stems = output_stems(list(unique.values()))
    for stem in stems.values():
        for name in planned_outputs(out, stem, transcode, extract_audio).values():
            if os.path.realpath(name) in protected:
                raise PrepareError(f"output {name} would overwrite a source file; choose another OUT")

    state = os.path.join(out, STATE_DIR)
    os.makedirs(state, exist_ok=True)
    options = {"transcode": transcode, "fps": fps if transcode else None, "gop": gop if transcode else None,
               "extract_audio": extract_audio, "version": OUTPUT_VERSION}
    if video_only:  # recorded only when set, so earlier runs' options stay the same
        options["video_only"] = True
    if short_side is not None:  # only when asked, so that outputs made before the option existed still match
        options["short_side"] = short_side
    if withdraw_outdated_lists(state, out, options):
        log(f"note: other output options than last time: {out}/manifest.csv withdrawn until this run ends")
    save_run(state, src, source_root, options, check, min_seconds)

    summary = PrepareSummary(os.path.join(out, "manifest.csv"), os.path.join(out, "rejected.csv"))
    pool = WorkerPool(workers)
    try:
        records = probe_all(unique, state, check, pool, progress, summary)
        if transcode or extract_audio:
            process_all(unique, stems, records, state, out, options, transcode, extract_audio, fps, gop,
                        min_seconds, pool, progress, summary)
    finally:
        pool.close()

    kept_rows, rejected_rows, reasons = manifest_rows(entries, records, out, transcode, extract_audio, min_seconds,
                                                      video_only)
    if not kept_rows:
        counts = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common(3))
        example = rejected_rows[0]
        raise PrepareError(f"no usable clip in {src}: all {len(rejected_rows)} rejected ({counts}"
                           f"{', ...' if len(reasons) > 3 else ''}; e.g. {example['path']}: {example['reason']}); "
                           f"nothing written to {out}/manifest.csv")
    columns = manifest_columns(entries, extract_audio, video_only)
    write_manifest(summary.manifest_path, kept_rows, columns=columns)
    write_manifest(summary.rejected_path, rejected_rows, columns=["path", "reason"])
    if shards:
        folder = os.path.join(out, SHARDS_DIR)
        index = write_shards(Manifest(out, kept_rows, columns), folder, shard_bytes=shard_bytes)
        summary.shards = os.path.join(folder, INDEX_NAME)
        log(f"wrote {len(index)} clips in {len(index.shards)} shard(s) to {folder}")
    summary.total = len(entries)
    summary.kept = len(kept_rows)
    summary.rejected = len(rejected_rows)
    summary.reasons = dict(reasons)
    summary.seconds = time.monotonic() - started
    summary.warnings = warnings
    return summary
