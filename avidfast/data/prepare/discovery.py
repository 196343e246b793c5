"""Finding the sources of ``avidfast prepare`` (a folder or a manifest) and planning where outputs go.

Nothing here writes: it lists the source files in order, with the path each output mirrors, the
real paths that must never be written, checks that OUT is safe to write into, and says why a
probed source is not a usable clip (:func:`source_reason`).

Every file of a folder SRC is a source, whatever its name: what it holds is found by probing its
content, so that a file is either kept or rejected with a reason, never silently left out. The
only files not listed are hidden ones (name starting with "."), OUT and the output folders of
earlier runs; :func:`find_sources` reports how many it left out so the caller can say so.
"""
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from avidfast.data.manifest import ManifestError, read_manifest
from avidfast.data.prepare.options import AUDIO_FORMATS, STATE_DIR, TRANSCODES, PrepareError
from avidfast.data.probe import ProbeResult, reject_reason

# What data sets ship video in. A file with another extension is probed all the same; one that
# FFmpeg cannot open is then "not a media file" rather than a broken video.
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".ogv",
                    ".ogg", ".flv", ".3gp", ".wmv")


@dataclass
class Entry:
    """One source file, as listed (a file listed twice gives two entries)."""

    source: str                  # absolute path
    key: str                     # path relative to the source root, "/"-separated
    row: Dict[str, object]       # the source manifest's row (empty for folder sources)


def relative(path: str, start: str) -> str:
    """``path`` relative to ``start``, "/"-separated (``path`` itself where none exists)."""
    try:
        return os.path.relpath(path, start).replace(os.sep, "/")
    except ValueError:  # another drive (Windows)
        return path


def is_prepared_folder(path: str) -> bool:
    """True for a folder that ``avidfast prepare`` wrote (it holds ``.prepare/``)."""
    return os.path.isdir(os.path.join(path, STATE_DIR))


def find_sources(src: str, root: Optional[str], out: str, skipped: Optional[List[str]] = None,
                 hidden: Optional[List[str]] = None) -> Tuple[List[Entry], str, set]:
    """Entries in source order, the source root, and the real paths that must never be written.

    A folder SRC lists every file in it and its subfolders except OUT, the output folders of
    earlier prepare runs (appended to ``skipped`` when given: their videos/ are outputs, not
    sources) and hidden files and folders (appended to ``hidden`` when given).
    """
    if os.path.isdir(src):
        if root is not None:
            raise PrepareError("--root only applies when SRC is a manifest, not a folder")
        base = os.path.abspath(src)
        entries = []
        for directory, folders, files in os.walk(base):
            kept_folders = []
            for name in sorted(folders):
                path = os.path.abspath(os.path.join(directory, name))
                if path == out:
                    continue
                if name.startswith("."):
                    if hidden is not None:
                        hidden.append(path)
                    continue
                if is_prepared_folder(path):
                    if skipped is not None:
                        skipped.append(path)
                    continue
                kept_folders.append(name)
            folders[:] = kept_folders
            for name in sorted(files):
                path = os.path.join(directory, name)
                if name.startswith("."):
                    if hidden is not None:
                        hidden.append(path)
                    continue
                entries.append(Entry(path, relative(path, base), {}))
        if not entries:
            raise PrepareError(f"{src}: no files found (hidden files and folders are left out)")
        protected = {os.path.realpath(e.source) for e in entries}
        return entries, base, protected
    if os.path.isfile(src):
        try:
            manifest = read_manifest(src, root)
        except ManifestError as error:
            raise PrepareError(str(error)) from None
        except (UnicodeDecodeError, ValueError) as error:
            raise PrepareError(f"manifest {src}: cannot be read as CSV ({error})") from None
        entries = []
        for i, row in enumerate(manifest.rows):
            path = os.path.normpath(manifest.path(i))
            rel = relative(path, manifest.root)
            if rel.startswith("../") or rel == ".." or os.path.isabs(rel):
                digest = hashlib.sha1(path.encode()).hexdigest()[:10]
                rel = f"_outside/{digest}/{os.path.basename(path)}"
            entries.append(Entry(path, rel, dict(row)))
        if not any(os.path.exists(e.source) for e in entries):
            where = f"--root {root}" if root is not None else f"the manifest's folder {manifest.root}"
            raise PrepareError(f"manifest {src}: none of its {len(entries)} files exists (paths are relative to "
                               f"{where}; e.g. {entries[0].source}); pass --root VIDEO_DIR, the folder they are in")
        protected = {os.path.realpath(e.source) for e in entries} | {os.path.realpath(src)}
        return entries, manifest.root, protected
    raise PrepareError(f"{src}: no such file or folder")


def source_reason(path: str, result: ProbeResult, min_seconds: float, require_audio: bool = True) -> Optional[str]:
    """Why the probed source ``path`` is not a usable clip (one short line), or None to keep it.

    :func:`avidfast.data.probe.reject_reason`, told apart for files that are not videos at all:
    "not a media file" (FFmpeg cannot open it and its extension is not a video one), "a still
    image" and "audio only". Without ``require_audio`` (``--video-only``) a video without sound is kept.
    """
    if result.error and result.error.startswith("cannot open container") \
            and not path.lower().endswith(VIDEO_EXTENSIONS):
        kind = os.path.splitext(path)[1] or "extension-less"
        return f"not a media file: FFmpeg cannot open this {kind} file"
    container = result.container or ""
    if result.error is None and (container == "image2" or container.endswith("_pipe")):  # a .jpg opens as video
        return f"a still image, not a video ({result.container})"
    if result.error is None and result.has_audio and not result.has_video:
        return "audio only (no video stream)"
    if result.error is None and not result.has_audio and not result.has_video:
        return f"no video stream (nor audio; FFmpeg reads it as {result.container})"
    return reject_reason(result, min_seconds, require_audio=require_audio)


def check_out(out: str, source_root: str, protected: set) -> None:
    if os.path.realpath(out) == os.path.realpath(source_root):
        raise PrepareError(f"OUT {out} is the source folder; choose a separate output folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"OUT {out} exists and is not a folder")
    for name in ("manifest.csv", "rejected.csv"):
        if os.path.realpath(os.path.join(out, name)) in protected:
            raise PrepareError(f"OUT/{name} would overwrite the source {os.path.join(out, name)}")
    if os.path.exists(os.path.join(out, "manifest.csv")) and not os.path.isdir(os.path.join(out, STATE_DIR)):
        raise PrepareError(f"{out} already holds a manifest.csv that avidfast prepare did not write; "
                           "choose another OUT")


def check_same_source(out: str, src: str, source_root: str) -> None:
    """Refuses to replace the manifest of an OUT prepared from another source (or root)."""
    if not os.path.isfile(os.path.join(out, "manifest.csv")):
        return
    try:
        with open(os.path.join(out, STATE_DIR, "options.json")) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(previous, dict):
        return
    before = (previous.get("src"), previous.get("root"))
    if before[0] is None or before == (os.path.abspath(src), source_root):
        return
    what = before[0] if before[0] != os.path.abspath(src) else f"{before[0]} with root {before[1]}"
    raise PrepareError(f"{out} holds the preparation of another source, {what}; preparing {src} there would "
                       "replace its manifest.csv: choose another OUT (or delete that folder first)")


def repeated_sources(entries: List[Entry]) -> List[Tuple[int, int, str]]:
    """(row, first row, key) for every source row that lists a file an earlier row lists (1-based rows)."""
    first: Dict[str, int] = {}
    repeats = []
    for row, entry in enumerate(entries, start=1):
        if entry.source in first:
            repeats.append((row, first[entry.source], entry.key))
        else:
            first[entry.source] = row
    return repeats


def output_stems(entries: List[Entry]) -> Dict[str, str]:
    """Source path -> output stem (relative to videos/ and audio/), collision-free."""
    plain = {e.source: os.path.splitext(e.key)[0] for e in entries}
    counts = Counter(s.lower() for s in plain.values())
    stems = {}
    for e in entries:
        stem = plain[e.source]
        if counts[stem.lower()] > 1:
            base, ext = os.path.splitext(e.key)
            stem = f"{base}_{ext.lstrip('.')}" if ext else f"{base}_"
        stems[e.source] = stem
    if len({s.lower() for s in stems.values()}) < len(stems):  # pathological: fall back to hashes
        stems = {src: f"{stem}_{hashlib.sha1(src.encode()).hexdigest()[:8]}" for src, stem in stems.items()}
    return stems


def planned_outputs(out: str, stem: str, transcode: Optional[str], extract_audio: Optional[str]) -> Dict[str, str]:
    planned = {}
    if transcode:
        planned["video"] = os.path.join(out, "videos", stem + TRANSCODES[transcode])
    if extract_audio:
        planned["audio"] = os.path.join(out, "audio", stem + AUDIO_FORMATS[extract_audio])
    return planned
