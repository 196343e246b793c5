"""``avidfast prepare``: probe a collection of videos, keep the usable ones, optionally re-encode.

Input (SRC): a manifest CSV (paths relative to its folder, or to ``root``) or a folder, searched
recursively for files ending in one of :data:`VIDEO_EXTENSIONS` (hidden files and folders, and
OUT when it lies inside SRC, are skipped).

Output folder OUT:
  * ``manifest.csv``: one row per usable clip, in source order, with ``path``, ``label`` (and any
    other column of a source manifest) and the metadata columns
    (:data:`avidfast.data.manifest.METADATA_COLUMNS`). All paths are relative to OUT, so
    ``read_manifest("OUT/manifest.csv")`` works as is:
      - with ``transcode``: ``path`` is the re-encoded file, ``videos/<source path>.<mp4|webm>``;
      - without: ``path`` points at the source file itself (``../raw/a.mp4``-style; absolute only
        where no relative path exists, e.g. another drive);
      - with ``extract_audio``: ``audio_path`` is ``audio/<source path>.<wav|flac>``, 24 kHz mono
        16-bit, whose sample 0 is at the time of the video's first frame.
    ``duration`` (s), ``fps``, ``width``, ``height`` describe the ``path`` file; ``sample_rate``
    (Hz) and ``channels`` the audio inside it (empty when a transcoded file carries none).
    ``<source path>`` mirrors the source tree: the path relative to the SRC folder (or manifest
    root) without its extension, plus ``_<ext>`` where two sources would otherwise collide; a
    manifest entry outside its root goes under ``_outside/<hash>/``.
  * ``rejected.csv``: ``path`` (relative to OUT, like above) and ``reason`` (one short line).
  * ``.prepare/``: one JSON record per source file (its probe and the outputs made from it) and
    the options of the last run. A rerun skips every file whose record matches the file's size and
    modification time and whose outputs exist and were made with the same options (outputs are
    written to a temporary name and renamed when complete, so an existing output is complete).

Sources are only read, never written: OUT may not be the source folder, and no output path may
be a source file. Work runs in ``workers`` spawned processes (0: in this process); a file that
hangs or crashes its worker is rejected with a reason instead of stopping the run.
"""
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from avidfast.data.manifest import METADATA_COLUMNS, ManifestError, read_manifest, write_manifest
from avidfast.data.probe import CHECKS, ProbeResult, probe, reject_reason
from avidfast.errors import AvidfastError
from avidfast.files import atomic_write_text

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
AUDIO_FORMATS = {"wav": ".wav", "flac": ".flac"}
TRANSCODES = {"h264": ".mp4", "vp9": ".webm"}
AUDIO_RATE = 24000  # Hz, mono, of extracted audio
STATE_DIR = ".prepare"
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_OUTPUT_VERSION = 1  # bump when the outputs' format changes, so that reruns redo them


class PrepareError(AvidfastError, ValueError):
    """A mistake in the arguments or inputs of :func:`prepare` (one line, for the user)."""


@dataclass
class PrepareSummary:
    """What :func:`prepare` did. ``reasons`` counts rejections by kind of reason."""

    manifest_path: str
    rejected_path: str
    total: int = 0          # source rows (a file listed twice counts twice)
    kept: int = 0
    rejected: int = 0
    reasons: Dict[str, int] = field(default_factory=dict)
    probed: int = 0         # files probed in this run (the others came from OUT/.prepare)
    processed: int = 0      # files transcoded and/or audio-extracted in this run
    reused: int = 0         # files whose outputs were already complete
    seconds: float = 0.0    # wall-clock time of the run

    def format(self) -> str:
        lines = [f"kept {self.kept} of {self.total} clips, rejected {self.rejected} "
                 f"({self.probed} probed, {self.processed} processed, {self.reused} reused; {self.seconds:.1f} s)"]
        for reason, count in sorted(self.reasons.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {count:6d}  {reason}")
        lines.append(f"manifest: {self.manifest_path}")
        lines.append(f"rejected: {self.rejected_path}")
        return "\n".join(lines)


def reason_kind(reason: str) -> str:
    """The kind of a reject reason, for counting: details (times, FFmpeg's words) removed."""
    head = reason.split(":")[0]
    head = re.sub(r"\s*\([^)]*\)", "", head)
    head = re.sub(r" (at|after) [\d.]+ s\b", "", head)
    return head.strip()


@dataclass
class _Entry:
    source: str                  # absolute path
    key: str                     # path relative to the source root, "/"-separated
    row: Dict[str, object]       # the source manifest's row (empty for folder sources)


def prepare(src: str, out_dir: str, *, root: Optional[str] = None, workers: int = 2,
            extract_audio: Optional[str] = None, transcode: Optional[str] = None, fps: int = 16,
            gop: int = 16, min_seconds: float = 2.0, check: str = "fast", progress: bool = True,
            log: Optional[Callable[[str], None]] = None) -> PrepareSummary:
    """Probes SRC, writes ``OUT/manifest.csv`` and ``OUT/rejected.csv``; see the module docstring.

    ``extract_audio``: None, "wav" or "flac" (24 kHz mono 16-bit). ``transcode``: None, "h264"
    (libx264 yuv420p in MP4 with AAC audio: for GPU decoding) or "vp9" (libvpx-vp9 realtime in
    WebM with Opus audio, or no audio when ``extract_audio`` is set: DALI's CPU backend decodes
    it). Transcoded video has a constant ``fps`` and a keyframe every ``gop`` frames, and even
    width and height (odd ones are scaled down by one pixel). ``min_seconds``: shorter clips are
    rejected. ``check``: how hard each file is probed, see :mod:`avidfast.data.probe`.
    ``log`` receives one-line notes (default: stderr when ``progress``).
    Raises :class:`PrepareError` for bad arguments or inputs.
    """
    started = time.monotonic()
    if extract_audio not in (None, *AUDIO_FORMATS):
        raise PrepareError(f"extract_audio must be one of {sorted(AUDIO_FORMATS)} or None, got {extract_audio!r}")
    if transcode not in (None, *TRANSCODES):
        raise PrepareError(f"transcode must be one of {sorted(TRANSCODES)} or None, got {transcode!r}")
    if check not in CHECKS:
        raise PrepareError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
    if not isinstance(fps, int) or fps < 1 or fps > 240:
        raise PrepareError(f"fps must be an integer between 1 and 240, got {fps}")
    if not isinstance(gop, int) or gop < 1:
        raise PrepareError(f"gop must be a positive integer, got {gop}")
    if workers < 0:
        raise PrepareError(f"workers must be 0 (in this process) or more, got {workers}")
    if not min_seconds >= 0:
        raise PrepareError(f"min_seconds must be >= 0, got {min_seconds}")
    if log is None:
        log = (lambda message: print(message, file=sys.stderr, flush=True)) if progress else (lambda message: None)

    out = os.path.abspath(out_dir)
    entries, source_root, protected = _find_sources(src, root, out)
    _check_out(out, source_root, protected)
    unique: Dict[str, _Entry] = {}
    for entry in entries:
        unique.setdefault(entry.source, entry)
    stems = _output_stems(list(unique.values()))
    for stem in stems.values():
        for name in _planned_outputs(out, stem, transcode, extract_audio).values():
            if os.path.realpath(name) in protected:
                raise PrepareError(f"output {name} would overwrite a source file; choose another OUT")

    state = os.path.join(out, STATE_DIR)
    os.makedirs(state, exist_ok=True)
    options = {"transcode": transcode, "fps": fps if transcode else None, "gop": gop if transcode else None,
               "extract_audio": extract_audio, "version": _OUTPUT_VERSION}
    run = json.dumps({"src": os.path.abspath(src), "root": source_root, "outputs": options, "check": check,
                      "min_seconds": min_seconds}, indent=2) + "\n"
    run_path = os.path.join(state, "options.json")
    if _read_text(run_path) != run:  # rewritten only when it changes (reruns leave OUT untouched)
        atomic_write_text(run_path, run)

    summary = PrepareSummary(os.path.join(out, "manifest.csv"), os.path.join(out, "rejected.csv"))
    pool = _WorkerPool(workers)
    try:
        records = _probe_all(unique, state, check, pool, progress, summary)
        if transcode or extract_audio:
            _process_all(unique, stems, records, state, out, options, transcode, extract_audio, fps, gop,
                         min_seconds, pool, progress, summary)
    finally:
        pool.close()

    kept_rows, rejected_rows = [], []
    reasons: Counter = Counter()
    for entry in entries:
        record = records[entry.source]
        result = ProbeResult.from_dict(record["probe"])
        reason = reject_reason(result, min_seconds)
        made = record.get("outputs") if (transcode or extract_audio) else None
        if reason is None and made is not None and made.get("error"):
            reason = made["error"]
        shown = _relative(entry.source, out)
        if reason is not None:
            rejected_rows.append({"path": shown, "reason": reason})
            reasons[reason_kind(reason)] += 1
            continue
        row = {k: v for k, v in entry.row.items() if k not in METADATA_COLUMNS}
        meta = {"duration": result.duration, "fps": result.fps, "width": result.width, "height": result.height,
                "sample_rate": result.sample_rate, "channels": result.channels,
                "audio_duration": result.audio_duration}
        row["path"] = shown
        if made is not None:
            files = made["result"]
            if transcode:
                row["path"] = files["video"]["path"]
                meta = {k: files["video"].get(k, meta[k] if k == "audio_duration" else None) for k in meta}
            if extract_audio:
                row["audio_path"] = files["audio"]["path"]
                meta["audio_duration"] = files["audio"].get("duration")
        row.update({k: _rounded(v) for k, v in meta.items()})
        kept_rows.append(row)

    columns = ["path"]
    source_columns = [c for c in (entries[0].row.keys() if entries else []) if c != "path"]
    if "label" in source_columns:
        columns.append("label")
    columns += [c for c in METADATA_COLUMNS if c != "audio_path" or extract_audio]
    columns += [c for c in source_columns if c not in columns and c not in METADATA_COLUMNS]
    write_manifest(summary.manifest_path, kept_rows, columns=columns)
    write_manifest(summary.rejected_path, rejected_rows, columns=["path", "reason"])
    summary.total = len(entries)
    summary.kept = len(kept_rows)
    summary.rejected = len(rejected_rows)
    summary.reasons = dict(reasons)
    summary.seconds = time.monotonic() - started
    if not kept_rows:
        log(f"warning: no usable clip in {src}; see {summary.rejected_path}")
    return summary


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value


def _relative(path: str, start: str) -> str:
    try:
        return os.path.relpath(path, start).replace(os.sep, "/")
    except ValueError:  # another drive (Windows)
        return path


# ----------------------------------------------------------------------------- sources


def _find_sources(src: str, root: Optional[str], out: str) -> Tuple[List[_Entry], str, set]:
    """Entries in source order, the source root, and the real paths that must never be written."""
    if os.path.isdir(src):
        if root is not None:
            raise PrepareError("--root only applies when SRC is a manifest, not a folder")
        base = os.path.abspath(src)
        entries = []
        for directory, folders, files in os.walk(base):
            folders[:] = sorted(f for f in folders if not f.startswith(".")
                                and os.path.abspath(os.path.join(directory, f)) != out)
            for name in sorted(files):
                if not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS):
                    path = os.path.join(directory, name)
                    entries.append(_Entry(path, _relative(path, base), {}))
        if not entries:
            raise PrepareError(f"{src}: no video files found (looked for {', '.join(VIDEO_EXTENSIONS)})")
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
            rel = _relative(path, manifest.root)
            if rel.startswith("../") or rel == ".." or os.path.isabs(rel):
                digest = hashlib.sha1(path.encode()).hexdigest()[:10]
                rel = f"_outside/{digest}/{os.path.basename(path)}"
            entries.append(_Entry(path, rel, dict(row)))
        protected = {os.path.realpath(e.source) for e in entries} | {os.path.realpath(src)}
        return entries, manifest.root, protected
    raise PrepareError(f"{src}: no such file or folder")


def _check_out(out: str, source_root: str, protected: set) -> None:
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


def _output_stems(entries: List[_Entry]) -> Dict[str, str]:
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


def _planned_outputs(out: str, stem: str, transcode: Optional[str], extract_audio: Optional[str]) -> Dict[str, str]:
    planned = {}
    if transcode:
        planned["video"] = os.path.join(out, "videos", stem + TRANSCODES[transcode])
    if extract_audio:
        planned["audio"] = os.path.join(out, "audio", stem + AUDIO_FORMATS[extract_audio])
    return planned


# ----------------------------------------------------------------------------- the two passes


def _record_path(state: str, source: str) -> str:
    return os.path.join(state, hashlib.sha1(source.encode()).hexdigest()[:24] + ".json")


def _load_record(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) and "probe" in record else None
    except (OSError, ValueError):
        return None


def _fingerprint(path: str) -> Tuple[Optional[int], Optional[int]]:
    try:
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    except OSError:
        return None, None


def _save(state: str, record: dict) -> None:
    atomic_write_text(_record_path(state, record["source"]), json.dumps(record, indent=1) + "\n")


def _probe_all(unique: Dict[str, _Entry], state: str, check: str, pool: "_WorkerPool", progress: bool,
               summary: PrepareSummary) -> Dict[str, dict]:
    records: Dict[str, dict] = {}
    tasks = []
    for source in unique:
        size, mtime = _fingerprint(source)
        record = _load_record(_record_path(state, source))
        if (record is not None and record.get("source") == source and record.get("size") == size
                and record.get("mtime_ns") == mtime and size is not None
                and CHECKS.index(record.get("check", "header")) >= CHECKS.index(check)):
            records[source] = record
        else:
            tasks.append((source, {"path": source, "check": check}, 60.0 + _PROBE_SECONDS))
    for source, status, value in _progress(pool.run(_probe_task, tasks), len(tasks), "probing", progress):
        size, mtime = _fingerprint(source)
        if status != "ok":
            value = ProbeResult(path=source, size_bytes=size or 0, error=f"probe failed: {value}").to_dict()
        result = value
        record = {"source": source, "size": size, "mtime_ns": mtime, "check": check, "probe": result}
        records[source] = record
        _save(state, record)
        summary.probed += 1
    return records


_PROBE_SECONDS = 120.0


def _probe_task(payload: dict) -> dict:
    return probe(payload["path"], check=payload["check"], max_seconds=_PROBE_SECONDS).to_dict()


def _process_all(unique, stems, records, state, out, options, transcode, extract_audio, fps, gop, min_seconds,
                 pool, progress, summary) -> None:
    tasks = []
    for source in unique:
        record = records[source]
        result = ProbeResult.from_dict(record["probe"])
        if reject_reason(result, min_seconds) is not None:
            continue
        planned = _planned_outputs(out, stems[source], transcode, extract_audio)
        made = record.get("outputs")
        if made is not None and made.get("options") == options and (
                made.get("error") or all(os.path.isfile(p) for p in planned.values())):
            summary.reused += 1
            continue
        payload = {"source": source, "video": planned.get("video"), "audio": planned.get("audio"),
                   "transcode": transcode, "fps": fps, "gop": gop, "audio_format": extract_audio,
                   "duration": result.duration, "video_start": result.video_start or 0.0,
                   "channels": result.channels, "sample_rate": result.sample_rate, "out": out}
        tasks.append((source, payload, 120.0 + 30.0 * (result.duration or 60.0)))
    what = "transcoding" if transcode else "extracting audio"
    for source, status, value in _progress(pool.run(_process_task, tasks), len(tasks), what, progress):
        record = records[source]
        if status == "ok" and "error" not in value:
            record["outputs"] = {"options": options, "result": value}
        else:
            message = value["error"] if status == "ok" else value
            step = "transcode" if transcode else "audio extraction"
            record["outputs"] = {"options": options, "error": f"{step} failed: {message}"}
        _save(state, record)
        summary.processed += 1


def _progress(items: Iterator, total: int, desc: str, enabled: bool) -> Iterator:
    if not enabled or total == 0:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="file", file=sys.stderr) as bar:
        for item in items:
            bar.update(1)
            yield item


# ----------------------------------------------------------------------------- worker processes


class _WorkerPool:
    """Runs picklable tasks in spawned processes, each with a deadline.

    Unlike concurrent.futures, a task that hangs or kills its process costs only that task: the
    process is killed (or found dead) and replaced, and the task is reported as failed.
    ``workers=0`` runs tasks in this process (no protection; for debugging and small jobs).
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._procs: List[tuple] = []  # (process, connection)

    def _spawn(self):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child,), daemon=True)
        process.start()
        child.close()
        return process, parent

    def run(self, fn: Callable[[dict], dict], tasks: List[tuple]) -> Iterator[Tuple[str, str, object]]:
        """Yields (key, "ok", result) or (key, "failed", message) per (key, payload, timeout) task."""
        if not tasks:
            return
        if self.workers == 0:
            for key, payload, _ in tasks:
                try:
                    yield key, "ok", fn(payload)
                except Exception as error:
                    yield key, "failed", f"{type(error).__name__}: {error}"
            return
        from multiprocessing.connection import wait

        while len(self._procs) < min(self.workers, len(tasks)):
            self._procs.append(self._spawn())
        pending = deque(tasks)
        idle = list(self._procs)
        busy: Dict[object, tuple] = {}  # connection -> (process, key, deadline, timeout)
        while pending or busy:
            while pending and idle:
                process, conn = idle.pop()
                key, payload, timeout = pending.popleft()
                try:
                    conn.send((fn, payload))
                except (OSError, EOFError):  # died while idle: replace it and retry the task
                    idle.append(self._replace(process, conn))
                    pending.appendleft((key, payload, timeout))
                    continue
                busy[conn] = (process, key, time.monotonic() + timeout, timeout)
            soonest = min(deadline for _, _, deadline, _ in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, soonest - time.monotonic())):
                process, key, _, _ = busy.pop(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    process.join(5)
                    code = process.exitcode
                    yield key, "failed", f"worker process died (exit code {code})"
                    idle.append(self._replace(process, conn))
                    continue
                yield key, status, value
                idle.append((process, conn))
            now = time.monotonic()
            for conn, (process, key, deadline, timeout) in list(busy.items()):
                if deadline <= now:
                    del busy[conn]
                    yield key, "failed", f"timed out after {timeout:.0f} s"
                    idle.append(self._replace(process, conn))

    def _replace(self, process, conn):
        if process.is_alive():
            process.kill()
        process.join(5)
        conn.close()
        self._procs = [(p, c) for p, c in self._procs if p is not process]
        fresh = self._spawn()
        self._procs.append(fresh)
        return fresh

    def close(self) -> None:
        for process, conn in self._procs:
            try:
                conn.send(None)
            except (OSError, EOFError):
                pass
        for process, conn in self._procs:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            conn.close()
        self._procs = []


def _worker_main(conn) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        fn, payload = message
        try:
            reply = ("ok", fn(payload))
        except BaseException as error:  # noqa: B902 - reported, the worker lives on
            reply = ("failed", f"{type(error).__name__}: {error}")
        try:
            conn.send(reply)
        except (OSError, EOFError):
            return


# ----------------------------------------------------------------------------- re-encoding


def _process_task(payload: dict) -> dict:
    """Transcodes and/or extracts the audio of one file; returns what it wrote or {"error": ...}."""
    targets = [t for t in (payload["video"], payload["audio"]) if t]
    temps = {t: _temp_name(t) for t in targets}
    try:
        made = _transcode(payload, temps)
        for target in targets:
            os.replace(temps[target], target)
        return made
    except Exception as error:
        text = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return {"error": " ".join(str(text).split())[:200]}
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.unlink(temp)


def _temp_name(target: str) -> str:
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):  # leftovers of a killed run
        if old.startswith(f".{name}.") and old.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, old))
            except OSError:
                pass
    return os.path.join(directory, f".{name}.{os.getpid()}.tmp")


def _transcode(payload: dict, temps: Dict[str, str]) -> dict:
    import av

    out = payload["out"]
    want_video = payload["video"] is not None
    with av.open(payload["source"], metadata_errors="ignore") as source:
        vin = next((s for s in source.streams.video if not _attached(s)), None)
        ain = source.streams.audio[0] if source.streams.audio else None
        if vin is None or ain is None:
            raise RuntimeError("the file lost a stream since it was probed")
        for stream in (vin, ain):
            stream.codec_context.thread_count = 1
        t0 = float(payload["video_start"] or 0.0)
        sinks = []
        extracted = None
        if payload["audio"]:
            extracted = _AudioFile(temps[payload["audio"]], payload["audio_format"])
            sinks.append(_Aligned(extracted, av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE),
                                  AUDIO_RATE, t0))
        writer = None
        if want_video:
            writer = _VideoWriter(temps[payload["video"]], payload, vin)
            if writer.audio is not None:
                sinks.append(_Aligned(writer, av.AudioResampler(format="fltp", layout=writer.audio_layout,
                                                                rate=writer.audio_rate), writer.audio_rate, t0))
        streams = [vin, ain] if want_video else [ain]
        try:
            for packet in source.demux(*streams):
                if packet.stream is ain:
                    for frame in ain.codec_context.decode(packet if packet.size else None):
                        for sink in sinks:
                            sink.push(frame)
                elif writer is not None:
                    for frame in vin.codec_context.decode(packet if packet.size else None):
                        writer.add_frame(frame)
            for sink in sinks:
                sink.finish()
            made = {}
            if writer is not None:
                info = writer.close()
                writer = None
                info["path"] = _relative(payload["video"], out)
                made["video"] = info
            if extracted is not None:
                made["audio"] = {"path": _relative(payload["audio"], out), "duration": extracted.close() / AUDIO_RATE}
                extracted = None
            return made
        finally:
            if writer is not None:
                writer.abort()
            if extracted is not None:
                extracted.abort()


def _attached(stream) -> bool:
    from avidfast.data.probe import _is_attached_picture

    return _is_attached_picture(stream)


class _Aligned:
    """Resamples decoded audio and shifts it so that output sample 0 is at time ``t0`` (s)."""

    def __init__(self, sink, resampler, rate: int, t0: float):
        self.sink, self.resampler, self.rate, self.t0 = sink, resampler, rate, t0
        self.skip: Optional[int] = None  # samples still to drop (> 0) or silence to add first (< 0)

    def push(self, frame) -> None:
        if self.skip is None:
            start = float(frame.time) if frame.time is not None else self.t0
            self.skip = int(round((self.t0 - start) * self.rate))
        for out in self.resampler.resample(frame):
            self._write(out.to_ndarray())

    def finish(self) -> None:
        for out in self.resampler.resample(None):
            self._write(out.to_ndarray())

    def _write(self, samples) -> None:
        import numpy as np

        if samples.ndim == 1:
            samples = samples[None]
        if self.skip and self.skip < 0:
            self.sink.write_audio(np.zeros((samples.shape[0], -self.skip), samples.dtype))
            self.skip = 0
        if self.skip and self.skip > 0:
            drop = min(self.skip, samples.shape[1])
            samples = samples[:, drop:]
            self.skip -= drop
        if samples.shape[1]:
            self.sink.write_audio(samples)


class _AudioFile:
    """A 24 kHz mono 16-bit WAV (Python's wave) or FLAC (PyAV) being written; counts samples."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind, self.samples = path, kind, 0
        if kind == "wav":
            import wave

            self.file = wave.open(path, "wb")
            self.file.setnchannels(1)
            self.file.setsampwidth(2)
            self.file.setframerate(AUDIO_RATE)
        else:
            import av

            self.file = av.open(path, "w", format="flac")
            self.stream = self.file.add_stream("flac", rate=AUDIO_RATE)
            self.stream.layout = "mono"
            self.stream.format = "s16"

    def write_audio(self, samples) -> None:
        """``samples``: (1, n) int16."""
        import numpy as np

        samples = np.ascontiguousarray(samples.reshape(1, -1), dtype=np.int16)
        if self.kind == "wav":
            self.file.writeframes(samples.tobytes())
        else:
            import av

            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = AUDIO_RATE
            frame.pts, frame.time_base = self.samples, Fraction(1, AUDIO_RATE)
            self.file.mux(self.stream.encode(frame))
        self.samples += samples.shape[1]

    def close(self) -> int:
        if self.kind != "wav":
            self.file.mux(self.stream.encode(None))
        self.file.close()
        return self.samples

    def abort(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass


class _VideoWriter:
    """Re-encodes to a constant frame rate with a fixed GOP, plus audio unless it goes to a file."""

    def __init__(self, path: str, payload: dict, vin):
        import av

        kind, self.fps, gop = payload["transcode"], payload["fps"], payload["gop"]
        width, height = vin.codec_context.width, vin.codec_context.height
        self.width, self.height = max(2, width - width % 2), max(2, height - height % 2)
        self.total = max(1, int(round((payload["duration"] or 0.0) * self.fps)))
        self.t0 = float(payload["video_start"] or 0.0)
        if kind == "h264":
            self.container = av.open(path, "w", format="mp4", options={"movflags": "+faststart"})
            self.video = self.container.add_stream("libx264", rate=self.fps)
            # fastdecode (no CABAC, no deblocking) roughly halves the loaders' decode time
            self.video.options = {"preset": "veryfast", "tune": "fastdecode", "crf": "23",
                                  "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        else:
            self.container = av.open(path, "w", format="webm")
            self.video = self.container.add_stream("libvpx-vp9", rate=self.fps)
            self.video.options = {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "crf": "32", "b:v": "0",
                                  "lag-in-frames": "0", "keyint_min": str(gop)}
        self.video.width, self.video.height = self.width, self.height
        self.video.pix_fmt = "yuv420p"
        self.video.codec_context.gop_size = gop
        self.video.codec_context.thread_count = 1
        self.audio = None
        self.audio_rate = self.audio_layout = None
        if kind == "h264" or not payload["audio"]:
            channels = payload.get("channels") or 1
            self.audio_layout = "mono" if channels == 1 else "stereo"
            rate = payload.get("sample_rate") or 48000
            if kind == "h264":
                self.audio_rate = rate if rate in _AAC_RATES else 48000
                self.audio = self.container.add_stream("aac", rate=self.audio_rate)
            else:
                self.audio_rate = 48000
                self.audio = self.container.add_stream("libopus", rate=self.audio_rate)
            self.audio.layout = self.audio_layout
        self.slot = 0          # next output frame index
        self.previous = None   # last input frame, converted
        self.audio_samples = 0

    def add_frame(self, frame) -> None:
        t = (float(frame.time) if frame.time is not None else self.slot / self.fps) - self.t0
        if self.previous is not None:
            # each output slot k (at k / fps) shows the input frame nearest in time
            while self.slot < self.total and (self.slot + 0.5) / self.fps < t:
                self._emit(self.previous)
        self.previous = frame.reformat(width=self.width, height=self.height, format="yuv420p")

    def _emit(self, frame) -> None:
        frame.pts, frame.time_base = self.slot, Fraction(1, self.fps)
        try:
            frame.pict_type = 0  # let the encoder place keyframes (every gop frames)
        except (AttributeError, TypeError, ValueError):
            pass
        self.container.mux(self.video.encode(frame))
        self.slot += 1

    def write_audio(self, samples) -> None:
        """``samples``: (channels, n) float32 at ``audio_rate``."""
        import av
        import numpy as np

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32), format="fltp",
                                           layout=self.audio_layout)
        frame.sample_rate = self.audio_rate
        frame.pts, frame.time_base = self.audio_samples, Fraction(1, self.audio_rate)
        self.container.mux(self.audio.encode(frame))
        self.audio_samples += samples.shape[1]

    def close(self) -> dict:
        if self.previous is None:
            raise RuntimeError("no video frame could be decoded")
        while self.slot < self.total:
            self._emit(self.previous)
        self.container.mux(self.video.encode(None))
        if self.audio is not None:
            self.container.mux(self.audio.encode(None))
        self.container.close()
        has_audio = self.audio is not None and self.audio_samples > 0
        return {"duration": self.total / self.fps, "fps": float(self.fps), "width": self.width,
                "height": self.height, "sample_rate": self.audio_rate if has_audio else None,
                "channels": (1 if self.audio_layout == "mono" else 2) if has_audio else None}

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:
            pass
