"""Published split and annotation files of UCF-101, HMDB-51, Kinetics and AudioSet, as manifest rows.

Each parser reads one data set's files in the format its authors publish and returns manifest rows
(dicts) for one split: ``path`` relative to the data set's video folder (so that
``avidfast prepare MANIFEST OUT --root VIDEO_DIR`` finds the files) and the class name(s):

- ``ucf101_rows``: ``ucfTrainTestlist/`` (``classInd.txt``, ``trainlist0N.txt``,
  ``testlist0N.txt``); paths ``<Class>/v_<Class>_gXX_cYY.avi``; ``label`` = the class folder.
- ``hmdb51_rows``: ``testTrainMulti_7030_splits/`` (``<action>_test_splitN.txt``, marks
  1 = train, 2 = test, 0 = unused); paths ``<action>/<video>.avi``; ``label`` = the action.
- ``kinetics_rows``: the Kinetics-400/600/700 CSVs (``label,youtube_id,time_start,time_end,split``
  and optionally ``is_cc``; test CSVs without ``label`` give rows without one); paths from a
  file-name pattern (default ``KINETICS_PATTERN``); also ``youtube_id``, ``time_start``,
  ``time_end``.
- ``audioset_rows``: the segment CSVs (``balanced_train_segments.csv``, ``eval_segments.csv``,
  ``unbalanced_train_segments.csv``), optionally with ``class_labels_indices.csv`` to turn MIDs
  into display names; paths from a pattern (default ``AUDIOSET_PATTERN``, the reference
  implementation's ``<YTID>_<start ms>_<end ms>.mp4``).

Multi-label rows (AudioSet): a segment's classes go to a ``labels`` column, joined by ``;``
(``avidfast.data.manifest.LABELS_SEPARATOR``) in the order the CSV lists them; such rows have no
``label`` column, which stays single-label so that the linear probe never mistakes a label set for
a class. A display name containing ``;`` is refused.

Every problem with a file raises ``SplitFormatError`` naming ``file:line`` and what is wrong
(wrong field count, non-integer index, unknown class, bad times, duplicate entry, empty file).
Bad arguments (fold, split, pattern) raise ``ValueError``.
"""
import csv
import io
import math
import os
import random
import re
import string
from typing import Dict, List, Optional, Sequence, Tuple

from avidfast.data.manifest import LABELS_SEPARATOR
from avidfast.errors import AvidfastError

KINETICS_PATTERN = "{label_or_split}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"
AUDIOSET_PATTERN = "{youtube_id}_{start_ms}_{end_ms}.mp4"
FOLDS = (1, 2, 3)
SPLITS = ("train", "test")

_KINETICS_REQUIRED = ("youtube_id", "time_start", "time_end", "split")
_KINETICS_OPTIONAL = ("label", "is_cc")
_HMDB_FILE = re.compile(r"^(?P<action>.+)_test_split(?P<fold>[123])\.txt$")
_YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]+$")
# a listed video: an 11-character YouTube id, alone or as a clip name <id>_<start_ms>_<end_ms>
_LISTED_VIDEO = re.compile(r"^(?P<id>[A-Za-z0-9_-]{11})(?:_\d+_\d+)?$")

Row = Dict[str, object]


class SplitFormatError(AvidfastError, ValueError):
    """A split or annotation file that is missing or malformed: the message names file:line."""


# ----------------------------------------------------------------------------- reading helpers


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise SplitFormatError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise SplitFormatError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _lines(path: str) -> List[Tuple[int, str]]:
    """(line number, stripped text) of every non-blank line; an empty file is an error."""
    lines = [(n, text.strip()) for n, text in enumerate(_read_text(path).split("\n"), start=1) if text.strip()]
    if not lines:
        raise SplitFormatError(f"{path}: empty file (no entries)")
    return lines


def _csv_records(path: str) -> List[Tuple[int, List[str]]]:
    """(line number, stripped fields) of every non-blank CSV record; an empty file is an error."""
    reader = csv.reader(io.StringIO(_read_text(path)), strict=True)
    records = []
    while True:
        start = reader.line_num + 1  # a record with an unclosed quote spans lines: name its first
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise SplitFormatError(f"{path}:{start}: not valid CSV ({error}; unbalanced quotes?)") from None
        if len(fields) > 1 or (fields and fields[0].strip()):
            records.append((start, [f.strip() for f in fields]))
    if not records:
        raise SplitFormatError(f"{path}: empty file (no entries)")
    return records


def _int(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SplitFormatError(f"{where}: {what} '{text}' is not an integer") from None


def _seconds(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SplitFormatError(f"{where}: {what} '{text}' is not a number of seconds") from None
    if not math.isfinite(value):
        raise SplitFormatError(f"{where}: {what} '{text}' is not a finite number of seconds")
    return value


def _check_times(start: float, end: float, where: str) -> None:
    if start < 0 or end <= start:
        raise SplitFormatError(f"{where}: bad times: start {start:g} s, end {end:g} s (need 0 <= start < end)")


def _relative_path(path: str, where: str) -> str:
    """Refuses empty, absolute and '..' paths (a row must stay inside the video folder)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise SplitFormatError(f"{where}: video path '{path}' is not a plain relative path "
                               "(empty part, '.', '..', backslash or leading '/')")
    return path


def _claim(seen: Dict[str, int], key: str, line: int, where: str, what: str) -> None:
    """Records key at line; a second occurrence is a duplicate entry."""
    if key in seen:
        raise SplitFormatError(f"{where}: duplicate {what} '{key}' (first on line {seen[key]})")
    seen[key] = line


def _check_choice(value, choices: Sequence, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _pattern_fields(pattern: str) -> List[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None]
    except ValueError as error:
        raise ValueError(f"pattern '{pattern}': {error}") from None


def _check_pattern(pattern: str, sample: Row) -> None:
    """Refuses unknown fields and format specs that do not fit the fields' types."""
    names = _pattern_fields(pattern)
    unknown = [n for n in names if n not in sample]
    if not names or unknown:
        problem = f"unknown field '{{{unknown[0]}}}'" if unknown else "uses no field"
        raise ValueError(f"pattern '{pattern}': {problem}; fields: {', '.join('{' + k + '}' for k in sample)}")
    try:
        pattern.format(**sample)
    except (ValueError, TypeError) as error:
        raise ValueError(f"pattern '{pattern}': {error}") from None


# ----------------------------------------------------------------------------- UCF-101


def read_ucf101_classes(path: str) -> List[str]:
    """Class names of ``classInd.txt`` (lines ``<index> <name>``, indices 1, 2, 3, ... in order)."""
    names: List[str] = []
    name_lines: Dict[str, int] = {}
    index_lines: List[int] = []
    for line, text in _lines(path):
        where = f"{path}:{line}"
        fields = text.split()
        if len(fields) != 2:
            raise SplitFormatError(f"{where}: expected '<class index> <class name>', got {len(fields)} fields")
        index = _int(fields[0], where, "class index")
        if 1 <= index <= len(names):
            raise SplitFormatError(f"{where}: duplicate class index {index} (first on line {index_lines[index - 1]})")
        if index != len(names) + 1:
            raise SplitFormatError(f"{where}: class index {index} out of order (expected {len(names) + 1}; "
                                   "indices run 1, 2, 3, ...)")
        _claim(name_lines, fields[1], line, where, "class name")
        index_lines.append(line)
        names.append(fields[1])
    return names


def ucf101_rows(list_dir: str, fold: int, split: str) -> List[Row]:
    """Rows of UCF-101 ``split`` ('train' or 'test') of ``fold`` (1-3) from ``ucfTrainTestlist/``.

    Train lines ``<Class>/<video>.avi <class index>`` must name the class of their folder in
    ``classInd.txt``; test lines ``<Class>/<video>.avi`` take the label from the folder.
    """
    _check_choice(fold, FOLDS, "fold")
    _check_choice(split, SPLITS, "split")
    class_file = os.path.join(list_dir, "classInd.txt")
    classes = read_ucf101_classes(class_file)
    known = set(classes)
    list_file = os.path.join(list_dir, f"{split}list0{fold}.txt")
    expected = "'<class>/<video>.avi <class index>'" if split == "train" else "'<class>/<video>.avi'"
    rows: List[Row] = []
    seen: Dict[str, int] = {}
    for line, text in _lines(list_file):
        where = f"{list_file}:{line}"
        fields = text.split()
        if len(fields) != (2 if split == "train" else 1):
            raise SplitFormatError(f"{where}: expected {expected}, got {len(fields)} fields")
        path = _relative_path(fields[0], where)
        if path.count("/") != 1:
            raise SplitFormatError(f"{where}: expected '<class folder>/<video file>', got '{path}'")
        folder = path.split("/")[0]
        if folder not in known:
            raise SplitFormatError(f"{where}: unknown class '{folder}' (not in {class_file})")
        if split == "train":
            index = _int(fields[1], where, "class index")
            if not 1 <= index <= len(classes):
                raise SplitFormatError(f"{where}: unknown class index {index} ({class_file} has 1..{len(classes)})")
            if classes[index - 1] != folder:
                raise SplitFormatError(f"{where}: class index {index} is '{classes[index - 1]}' in {class_file}, "
                                       f"but the video is in folder '{folder}'")
        _claim(seen, path, line, where, "video")
        rows.append({"path": path, "label": folder})
    return rows


# ----------------------------------------------------------------------------- HMDB-51


def hmdb51_rows(split_dir: str, fold: int, split: str) -> List[Row]:
    """Rows of HMDB-51 ``split`` ('train': mark 1, 'test': mark 2) of ``fold`` (1-3).

    Reads every ``<action>_test_split<fold>.txt`` of ``split_dir`` (lines ``<video>.avi <0|1|2>``);
    an action that has files for other folds but not this one is an error.
    """
    _check_choice(fold, FOLDS, "fold")
    _check_choice(split, SPLITS, "split")
    if not os.path.isdir(split_dir):
        raise SplitFormatError(f"{split_dir}: no such folder")
    by_fold: Dict[int, Dict[str, str]] = {f: {} for f in FOLDS}
    for name in os.listdir(split_dir):
        match = _HMDB_FILE.match(name)
        if match:
            by_fold[int(match["fold"])][match["action"]] = name
    chosen = by_fold[fold]
    if not chosen:
        raise SplitFormatError(f"{split_dir}: no '<action>_test_split{fold}.txt' files")
    lacking = sorted(set().union(*by_fold.values()) - set(chosen))
    if lacking:
        raise SplitFormatError(f"{split_dir}: no {lacking[0]}_test_split{fold}.txt, though other folds have "
                               f"action '{lacking[0]}' ({len(lacking)} action(s) lack fold {fold})")
    wanted = "1" if split == "train" else "2"
    rows: List[Row] = []
    for action in sorted(chosen):
        path = os.path.join(split_dir, chosen[action])
        seen: Dict[str, int] = {}
        for line, text in _lines(path):
            where = f"{path}:{line}"
            fields = text.rsplit(None, 1)
            if len(fields) != 2 or not fields[0].lower().endswith(".avi"):
                raise SplitFormatError(f"{where}: expected '<video>.avi <0|1|2>', got {len(text.split())} "
                                       f"field(s): '{text}'")
            video, mark = fields
            if mark not in ("0", "1", "2"):
                raise SplitFormatError(f"{where}: split mark '{mark}' is not 0 (unused), 1 (train) or 2 (test)")
            _relative_path(video, where)
            if "/" in video:
                raise SplitFormatError(f"{where}: expected a file name, got the path '{video}'")
            _claim(seen, video, line, where, "video")
            if mark == wanted:
                rows.append({"path": f"{action}/{video}", "label": action})
    return rows


# ----------------------------------------------------------------------------- Kinetics


def _kinetics_fields(youtube_id: str, start: int, end: int, split: str, label: str) -> Row:
    return {"youtube_id": youtube_id, "time_start": start, "time_end": end, "split": split, "label": label,
            "label_underscored": label.replace(" ", "_"), "label_or_split": label or split}


def kinetics_rows(csv_path: str, pattern: str = KINETICS_PATTERN, split: Optional[str] = None) -> List[Row]:
    """Rows of a Kinetics-400/600/700 CSV, optionally only those whose ``split`` column equals ``split``.

    ``pattern`` names each clip's file relative to the video folder (``str.format`` fields
    ``{youtube_id}``, ``{time_start}``, ``{time_end}`` (int seconds), ``{split}``, ``{label}``,
    ``{label_underscored}`` (spaces as ``_``) and ``{label_or_split}`` (the label, or the split
    for a CSV without labels)). Rows carry ``label`` when the CSV has labels.
    """
    _check_pattern(pattern, _kinetics_fields("abcdefghijk", 0, 10, "train", "label"))
    records = _csv_records(csv_path)
    (header_line, header), body = records[0], records[1:]
    where = f"{csv_path}:{header_line}"
    for name in header:
        if header.count(name) > 1:
            raise SplitFormatError(f"{where}: column '{name}' appears twice in the header")
    missing = [c for c in _KINETICS_REQUIRED if c not in header]
    unknown = [c for c in header if c not in _KINETICS_REQUIRED + _KINETICS_OPTIONAL]
    if missing or unknown:
        problem = f"no column '{missing[0]}'" if missing else f"unknown column '{unknown[0]}'"
        raise SplitFormatError(f"{where}: {problem}; a Kinetics CSV has the header "
                               "'label,youtube_id,time_start,time_end,split' (optionally ',is_cc'; "
                               "test CSVs may lack 'label')")
    label_fields = {"label", "label_underscored"} & set(_pattern_fields(pattern))
    if "label" not in header and label_fields:
        raise ValueError(f"pattern '{pattern}' uses {{{sorted(label_fields)[0]}}} but {csv_path} has no label "
                         "column; use {label_or_split} or {split}")
    if not body:
        raise SplitFormatError(f"{csv_path}: a header but no rows")
    rows: List[Row] = []
    seen: Dict[str, int] = {}
    splits: Dict[str, int] = {}
    labelled: Dict[bool, int] = {}
    for line, fields in body:
        where = f"{csv_path}:{line}"
        if len(fields) != len(header):
            raise SplitFormatError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(fields)}")
        record = dict(zip(header, fields))
        youtube_id = record["youtube_id"]
        if not _YOUTUBE_ID.match(youtube_id):
            raise SplitFormatError(f"{where}: youtube_id '{youtube_id}' is not a YouTube id (letters, digits, _ and -)")
        start = _int(record["time_start"], where, "time_start")
        end = _int(record["time_end"], where, "time_end")
        _check_times(start, end, where)
        if not record["split"]:
            raise SplitFormatError(f"{where}: empty split")
        label = record.get("label", "")
        labelled.setdefault(bool(label), line)
        if len(labelled) > 1:
            raise SplitFormatError(f"{where}: {'a' if label else 'no'} label, unlike line {labelled[not label]}: "
                                   "either every row has a label or none has")
        path = _relative_path(pattern.format(**_kinetics_fields(youtube_id, start, end, record["split"], label)), where)
        _claim(seen, path, line, where, "clip")
        splits[record["split"]] = splits.get(record["split"], 0) + 1
        if split is None or record["split"] == split:
            row: Row = {"path": path, "youtube_id": youtube_id, "time_start": start, "time_end": end}
            if label:
                row["label"] = label
            rows.append(row)
    if not rows:
        raise ValueError(f"{csv_path}: no rows with split '{split}' (it has: "
                         + ", ".join(f"{name} ({count})" for name, count in sorted(splits.items())) + ")")
    return rows


# ----------------------------------------------------------------------------- AudioSet


def read_audioset_classes(path: str) -> Dict[str, str]:
    """MID -> display name from ``class_labels_indices.csv`` (header ``index,mid,display_name``)."""
    records = _csv_records(path)
    (header_line, header), body = records[0], records[1:]
    if header != ["index", "mid", "display_name"]:
        raise SplitFormatError(f"{path}:{header_line}: expected the header 'index,mid,display_name', "
                               f"got '{','.join(header)}'")
    if not body:
        raise SplitFormatError(f"{path}: a header but no classes")
    names: Dict[str, str] = {}
    name_lines: Dict[str, int] = {}
    for position, (line, fields) in enumerate(body):
        where = f"{path}:{line}"
        if len(fields) != 3:
            raise SplitFormatError(f"{where}: expected 3 fields (index,mid,display_name), got {len(fields)}")
        index, mid, name = fields
        if _int(index, where, "class index") != position:
            raise SplitFormatError(f"{where}: class index {index} out of order (expected {position}; "
                                   "indices run 0, 1, 2, ...)")
        if not mid.startswith("/"):
            raise SplitFormatError(f"{where}: '{mid}' is not a MID (like /m/09x0r)")
        if not name or LABELS_SEPARATOR in name:
            raise SplitFormatError(f"{where}: display name '{name}' is empty or contains '{LABELS_SEPARATOR}'")
        if mid in names:
            raise SplitFormatError(f"{where}: duplicate MID '{mid}' (first on line {name_lines[names[mid]]})")
        _claim(name_lines, name, line, where, "display name")
        names[mid] = name
    return names


def _audioset_fields(youtube_id: str, start: float, end: float, split: str) -> Row:
    return {"youtube_id": youtube_id, "start_ms": round(start * 1000), "end_ms": round(end * 1000),
            "time_start": start, "time_end": end, "split": split}


def audioset_rows(csv_path: str, pattern: str = AUDIOSET_PATTERN,
                  class_names: Optional[Dict[str, str]] = None) -> List[Row]:
    """Rows of an AudioSet segment CSV (``# ...`` comment lines, then ``YTID, start, end, "mid,mid"``).

    ``pattern`` names each clip's file (fields ``{youtube_id}``, ``{start_ms}``, ``{end_ms}``
    (int milliseconds), ``{time_start}``, ``{time_end}`` (float seconds) and ``{split}`` (the
    file name without ``_segments.csv``, e.g. ``eval``)). ``labels`` holds the MIDs, or their
    display names when ``class_names`` (see ``read_audioset_classes``) is given, joined by ``;``.
    """
    split = os.path.basename(csv_path).rsplit(".", 1)[0].replace("_segments", "")
    _check_pattern(pattern, _audioset_fields("abcdefghijk", 30.0, 40.0, split))
    lines = [(n, text) for n, text in _lines(csv_path) if not text.startswith("#")]
    if not lines:
        raise SplitFormatError(f"{csv_path}: no segments (only comment lines)")
    rows: List[Row] = []
    seen: Dict[str, int] = {}
    for line, text in lines:
        where = f"{csv_path}:{line}"
        try:
            fields = next(csv.reader([text], skipinitialspace=True, strict=True))
        except csv.Error as error:
            raise SplitFormatError(f"{where}: not valid CSV ({error})") from None
        if len(fields) != 4:
            raise SplitFormatError(f"{where}: expected 4 fields (YTID, start_seconds, end_seconds, "
                                   f"\"label1,label2,...\" in quotes), got {len(fields)}")
        youtube_id, start_text, end_text, label_text = (f.strip() for f in fields)
        if not _YOUTUBE_ID.match(youtube_id):
            raise SplitFormatError(f"{where}: YTID '{youtube_id}' is not a YouTube id (letters, digits, _ and -)")
        start = _seconds(start_text, where, "start_seconds")
        end = _seconds(end_text, where, "end_seconds")
        _check_times(start, end, where)
        mids = [m.strip() for m in label_text.split(",")]
        for position, mid in enumerate(mids):
            if not mid.startswith("/"):
                raise SplitFormatError(f"{where}: label '{mid}' is not a MID (like /m/09x0r)")
            if class_names is not None and mid not in class_names:
                raise SplitFormatError(f"{where}: unknown class '{mid}' (not in the class list)")
            if mid in mids[:position]:
                raise SplitFormatError(f"{where}: duplicate label '{mid}' in one segment")
        path = _relative_path(pattern.format(**_audioset_fields(youtube_id, start, end, split)), where)
        _claim(seen, path, line, where, "clip")
        names = [class_names[m] for m in mids] if class_names is not None else mids
        rows.append({"path": path, "labels": LABELS_SEPARATOR.join(names), "youtube_id": youtube_id,
                     "time_start": start, "time_end": end})
    return rows


# ----------------------------------------------------------------------------- existence check


def read_youtube_ids(path: str) -> List[str]:
    """The YouTube ids a text file lists, in its order: one per line, either the id itself or a
    clip file name ``<id>_<start_ms>_<end_ms>.mp4`` (folders and extension dropped), as in the
    AVID-CMA code's ``unbalanced_train-100k.txt``; blank lines and ``# ...`` lines are skipped.
    SplitFormatError (FILE:LINE) on anything else or a repeated id."""
    ids: List[str] = []
    seen: Dict[str, int] = {}
    for line, text in _lines(path):
        if text.startswith("#"):
            continue
        where = f"{path}:{line}"
        token = text.split()[0]
        match = _LISTED_VIDEO.match(os.path.basename(token).split(".")[0])
        if match is None:
            raise SplitFormatError(f"{where}: '{token}' is neither a YouTube id (11 letters, digits, _ or -) nor a "
                                   "clip name <id>_<start_ms>_<end_ms>[.mp4]")
        _claim(seen, match.group("id"), line, where, "YouTube id")
        ids.append(match.group("id"))
    if not ids:
        raise SplitFormatError(f"{path}: no YouTube ids (only comment lines)")
    return ids


def rows_of_ids(rows: Sequence[Row], ids: Sequence[str]) -> Tuple[List[Row], List[str]]:
    """(the rows whose youtube_id is in ``ids``, in the order of ``ids``; the ids without a row)."""
    by_id: Dict[str, List[Row]] = {}
    for row in rows:
        by_id.setdefault(row["youtube_id"], []).append(row)
    kept: List[Row] = []
    absent: List[str] = []
    for youtube_id in ids:
        if youtube_id in by_id:
            kept.extend(by_id[youtube_id])
        else:
            absent.append(youtube_id)
    return kept, absent


def random_rows(rows: Sequence[Row], size: int, seed: int) -> List[Row]:
    """``size`` rows drawn without replacement by Python's ``random.Random(seed)``, kept in their
    order in ``rows``: the same subset for the same rows and seed. ValueError when size is not in
    [1, len(rows)]."""
    if not 1 <= size <= len(rows):
        raise ValueError(f"--subset-size {size}: must lie in [1, {len(rows)}] (the rows of the CSV)")
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), size))]


def drop_missing(rows: Sequence[Row], video_dir: str) -> Tuple[List[Row], List[str]]:
    """(rows whose file exists under video_dir, paths of those that do not), both in row order."""
    kept, missing = [], []
    for row in rows:
        (kept if os.path.isfile(os.path.join(video_dir, str(row["path"]))) else missing).append(row)
    return kept, [str(r["path"]) for r in missing]
