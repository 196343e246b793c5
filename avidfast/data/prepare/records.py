"""Per-file records, the two passes that fill them, and the rows of ``manifest.csv`` / ``rejected.csv``.

``OUT/.prepare/`` holds one JSON record per source file: its fingerprint (size, modification
time), its probe and, once made, the outputs and the options they were made with. A pass redoes a
file only when its record is missing or stale (see the package docstring), so reruns resume.
"""
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from avidfast.data.manifest import METADATA_COLUMNS
from avidfast.data.prepare.discovery import Entry, planned_outputs, relative, source_reason
from avidfast.data.prepare.pool import WorkerPool, progress_bar
from avidfast.data.prepare.writers import process_task
from avidfast.data.probe import CHECKS, ProbeResult, probe
from avidfast.files import atomic_write_text


@dataclass
class PrepareSummary:
    """What :func:`prepare` did. ``reasons`` counts rejections by kind of reason."""

    manifest_path: str
    rejected_path: str
    total: int = 0          # source files (rows of a manifest SRC: a file listed twice counts twice)
    kept: int = 0
    rejected: int = 0
    reasons: Dict[str, int] = field(default_factory=dict)
    probed: int = 0         # files probed in this run (the others came from OUT/.prepare)
    processed: int = 0      # files transcoded and/or audio-extracted in this run
    reused: int = 0         # files whose outputs were already complete
    seconds: float = 0.0    # wall-clock time of the run
    warnings: List[str] = field(default_factory=list)  # what the run noticed but did not stop for
    shards: Optional[str] = None  # the shard index written with ``shards=True``

    def format(self) -> str:
        lines = [f"found {self.total} files: kept {self.kept}, rejected {self.rejected} "
                 f"({self.probed} probed, {self.processed} processed, {self.reused} reused; {self.seconds:.1f} s)"]
        for reason, count in sorted(self.reasons.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {count:6d}  {reason}")
        lines.append(f"manifest: {self.manifest_path}")
        lines.append(f"rejected: {self.rejected_path}")
        if self.shards:
            lines.append(f"shards:   {self.shards}")
        return "\n".join(lines)


def reason_kind(reason: str) -> str:
    """The kind of a reject reason, for counting: details (times, FFmpeg's words) removed."""
    head = reason.split(":")[0]
    head = re.sub(r"\s*\([^)]*\)", "", head)
    head = re.sub(r" (at|after) [\d.]+ s\b", "", head)
    return head.strip()


def save_run(state: str, src: str, source_root: str, options: dict, check: str, min_seconds: float) -> None:
    """Writes ``options.json`` (what this run was asked) into the state folder."""
    run = json.dumps({"src": os.path.abspath(src), "root": source_root, "outputs": options, "check": check,
                      "min_seconds": min_seconds}, indent=2) + "\n"
    run_path = os.path.join(state, "options.json")
    if _read_text(run_path) != run:  # rewritten only when it changes (reruns leave OUT untouched)
        atomic_write_text(run_path, run)


def withdraw_outdated_lists(state: str, out: str, options: dict) -> bool:
    """Removes OUT's manifest.csv and rejected.csv when this run's output options differ from
    those they were made with (the run replaces the files they list): a run stopped half-way,
    even by SIGKILL, then leaves no list describing a mix of old and new outputs. True if removed."""
    try:
        with open(os.path.join(state, "options.json")) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return False
    manifest = os.path.join(out, "manifest.csv")
    if not isinstance(previous, dict) or previous.get("outputs") == options or not os.path.isfile(manifest):
        return False
    for name in (manifest, os.path.join(out, "rejected.csv")):
        if os.path.isfile(name):
            os.unlink(name)
    return True


def manifest_rows(entries: List[Entry], records: Dict[str, dict], out: str, transcode: Optional[str],
                  extract_audio: Optional[str], min_seconds: float,
                  video_only: bool = False) -> Tuple[List[dict], List[dict], Counter]:
    """The rows of manifest.csv and rejected.csv in source order, and the rejections by kind
    (``video_only``: files without sound are kept, ``has_audio`` says which have it)."""
    kept_rows, rejected_rows = [], []
    reasons: Counter = Counter()
    for entry in entries:
        record = records[entry.source]
        result = ProbeResult.from_dict(record["probe"])
        reason = source_reason(entry.source, result, min_seconds, require_audio=not video_only)
        made = record.get("outputs") if (transcode or extract_audio) else None
        if reason is None and made is not None and made.get("error"):
            reason = made["error"]
        shown = relative(entry.source, out)
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
        if video_only:
            row["has_audio"] = int(result.has_audio)
        kept_rows.append(row)
    return kept_rows, rejected_rows, reasons


def manifest_columns(entries: List[Entry], extract_audio: Optional[str], video_only: bool = False) -> List[str]:
    """manifest.csv's columns: path, label, the metadata (and ``has_audio`` for a ``video_only`` set),
    then the source manifest's other columns."""
    columns = ["path"]
    source_columns = [c for c in (entries[0].row.keys() if entries else []) if c != "path"]
    if "label" in source_columns:
        columns.append("label")
    columns += [c for c in METADATA_COLUMNS if c != "audio_path" or extract_audio]
    if video_only:
        columns.append("has_audio")
    columns += [c for c in source_columns if c not in columns and c not in METADATA_COLUMNS]
    return columns


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value


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


def probe_all(unique: Dict[str, Entry], state: str, check: str, pool: WorkerPool, progress: bool,
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
            tasks.append((source, {"path": source, "check": check}, 60.0 + PROBE_SECONDS))
    for source, status, value in progress_bar(pool.run(probe_task, tasks), len(tasks), "probing", progress):
        size, mtime = _fingerprint(source)
        if status != "ok":
            value = ProbeResult(path=source, size_bytes=size or 0, error=f"probe failed: {value}").to_dict()
        result = value
        record = {"source": source, "size": size, "mtime_ns": mtime, "check": check, "probe": result}
        records[source] = record
        _save(state, record)
        summary.probed += 1
    return records


PROBE_SECONDS = 120.0


def probe_task(payload: dict) -> dict:
    return probe(payload["path"], check=payload["check"], max_seconds=PROBE_SECONDS).to_dict()


def process_all(unique, stems, records, state, out, options, transcode, extract_audio, fps, gop, min_seconds,
                pool, progress, summary) -> None:
    tasks = []
    for source in unique:
        record = records[source]
        result = ProbeResult.from_dict(record["probe"])
        if source_reason(source, result, min_seconds) is not None:
            continue
        planned = planned_outputs(out, stems[source], transcode, extract_audio)
        made = record.get("outputs")
        if made is not None and made.get("options") == options and (
                made.get("error") or all(os.path.isfile(p) for p in planned.values())):
            summary.reused += 1
            continue
        payload = {"source": source, "video": planned.get("video"), "audio": planned.get("audio"),
                   "transcode": transcode, "fps": fps, "gop": gop, "short_side": options.get("short_side"),
                   "audio_format": extract_audio,
                   "duration": result.duration, "video_start": result.video_start or 0.0,
                   "channels": result.channels, "sample_rate": result.sample_rate, "out": out}
        tasks.append((source, payload, 120.0 + 30.0 * (result.duration or 60.0)))
    what = "transcoding" if transcode else "extracting audio"
    for source, status, value in progress_bar(pool.run(process_task, tasks), len(tasks), what, progress):
        record = records[source]
        if status == "ok" and "error" not in value:
            record["outputs"] = {"options": options, "result": value}
        else:
            message = value["error"] if status == "ok" else value
            step = "transcode" if transcode else "audio extraction"
            record["outputs"] = {"options": options, "error": f"{step} failed: {message}"}
        _save(state, record)
        summary.processed += 1
