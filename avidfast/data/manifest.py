"""Manifests: a CSV with one row per video (one memory slot), paths relative to a root.

Required column: ``path``. Optional: ``label`` and the metadata written by ``avidfast prepare``
(``duration`` of the video in seconds, ``fps``, ``width``, ``height``, ``sample_rate`` in Hz,
``channels``, ``audio_duration`` in seconds (of the audio the loaders read), ``audio_path``: the
extracted 24 kHz mono WAV/FLAC, relative to the same root). Unknown columns
are kept and written back unchanged.

``label`` is one class name per row (what the probes train on). A multi-label set (AudioSet)
has instead a ``labels`` column: the row's class names joined by ``LABELS_SEPARATOR``.
"""
import csv
import hashlib
import io
import os
import posixpath
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, overload

import numpy as np

from avidfast.errors import AvidfastError
from avidfast.files import atomic_write

LABELS_SEPARATOR = ";"
METADATA_COLUMNS = ("duration", "fps", "width", "height", "sample_rate", "channels", "audio_duration", "audio_path")
_FLOAT_COLUMNS = {"duration", "fps", "audio_duration"}
_INT_COLUMNS = {"width", "height", "sample_rate", "channels"}


class ManifestError(AvidfastError, ValueError):
    """A manifest that cannot be read: the message names the file and the row."""


class ManifestRows(Sequence):
    """The rows of a manifest read from a CSV, stored by column: metadata numbers in float64 arrays
    (NaN where empty), text in one list per column (each distinct label stored once). About 200
    bytes per row for the prepare columns (a dict per row would take about four times that).

    ``rows[i]`` builds the row's dict (column -> value, numbers parsed, ``None`` where empty);
    ``column(name)`` gives one column's values without building rows.
    """

    def __init__(self, columns: Sequence[str], text: Dict[str, list], numbers: Dict[str, np.ndarray]):
        self.columns = list(columns)
        self._text, self._numbers = text, numbers
        self._count = len(text["path"])

    def __len__(self) -> int:
        return self._count

    def _value(self, column: str, i: int):
        if column in self._numbers:
            value = self._numbers[column][i]
            if value != value:  # NaN: empty
                return None
            return int(value) if column in _INT_COLUMNS else float(value)
        return self._text[column][i]

    @overload
    def __getitem__(self, i: int) -> Dict[str, object]: ...

    @overload
    def __getitem__(self, i: slice) -> List[Dict[str, object]]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"row {i} of a manifest of {self._count} rows")
        return {column: self._value(column, i) for column in self.columns}

    def __iter__(self) -> Iterator[Dict[str, object]]:
        return (self[i] for i in range(self._count))

    def __eq__(self, other) -> bool:
        """Equal to any sequence of the same row dicts (a list of dicts included)."""
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None

    def column(self, name: str) -> list:
        """The values of column ``name`` in row order (``None`` where empty)."""
        if name in self._numbers:
            values = self._numbers[name]
            cast = int if name in _INT_COLUMNS else float
            return [None if v != v else cast(v) for v in values.tolist()]
        return list(self._text[name])


@dataclass
class Manifest:
    """Rows of a manifest and the root its relative paths resolve against.

    ``rows[i]`` is a dict of column -> value (numbers parsed for the metadata columns, ``None``
    where empty). Row i is memory slot i.
    """

    root: str
    rows: Sequence[Dict[str, object]]  # a list of dicts, or the ManifestRows of read_manifest
    columns: List[str] = field(default_factory=lambda: ["path"])

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list:
        """The values of column ``name`` in row order (``None`` where a row has none)."""
        if isinstance(self.rows, ManifestRows) and name in self.rows.columns:
            return self.rows.column(name)
        return [row.get(name) for row in self.rows]

    def path(self, i: int) -> str:
        """Absolute path of row i's video."""
        return os.path.join(self.root, str(self.rows[i]["path"]))

    def audio_path(self, i: int) -> str:
        """Absolute path of row i's extracted audio if it has one, else of its video."""
        extracted = self.rows[i].get("audio_path")
        return os.path.join(self.root, str(extracted)) if extracted else self.path(i)

    @property
    def has_labels(self) -> bool:
        return "label" in self.columns and all(label not in (None, "") for label in self.column("label"))

    @property
    def classes(self) -> List[str]:
        """Distinct labels of the labelled rows in natural order (integers by value, then names): a
        label's class index is its position here, in every protocol. ``[]`` without a label column."""
        if "label" not in self.columns:
            return []
        return sorted({str(label) for label in self.column("label") if label not in (None, "")}, key=_natural_key)

    def label_indices(self, classes: Optional[Sequence[str]] = None, unlabelled: Optional[int] = None) -> List[int]:
        """Class index of every row: its position in ``classes`` (default: this manifest's own
        ``classes``; pass the training manifest's to index a test manifest the same way). Every row
        needs a label, unless ``unlabelled`` is given: rows without one then get that value (e.g. -1)."""
        if not (self.has_labels or (unlabelled is not None and "label" in self.columns)):
            raise ManifestError("this manifest has no 'label' column (or some rows have no label)")
        lookup = {str(name): i for i, name in enumerate(self.classes if classes is None else classes)}
        labelled = [str(label) if label not in (None, "") else None for label in self.column("label")]
        unknown = sorted({label for label in labelled if label is not None} - set(lookup), key=_natural_key)
        if unknown:
            raise ManifestError(f"labels {unknown[:5]} are not among the {len(lookup)} given classes "
                                "(is this manifest from the same data set as the training one?)")
        return [unlabelled if label is None else lookup[label] for label in labelled]


def manifest_fingerprint(manifest: Manifest) -> str:
    """sha256 (hex) of the rows' video paths in order, each relative to the manifest's root.

    It names which video each memory slot holds: the same rows in the same order give the same
    fingerprint wherever the data set (CSV and videos together) is moved; another order, another
    video or a row more or less gives another one. Labels and metadata columns do not count.
    """
    digest = hashlib.sha256()
    for path in manifest.column("path"):
        path = str(path)
        if os.path.isabs(path):
            path = os.path.relpath(path, manifest.root)
        digest.update(posixpath.normpath(path.replace(os.sep, "/")).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _natural_key(text: str):
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


def _parse(column: str, value: str, where: str):
    if value == "":
        return None
    try:
        if column in _FLOAT_COLUMNS:
            return float(value)
        if column in _INT_COLUMNS:
            return int(float(value))
    except ValueError:
        raise ManifestError(f"{where}: column '{column}' has '{value}', which is not a number") from None
    return value


_CHUNK_ROWS = 16384  # rows parsed per step: numbers go to arrays a chunk at a time
_SHARED_VALUES = 100_000  # distinct values beyond which a text column is stored without sharing


def _numbers(column: str, values: Sequence[str], lines: Sequence[int], path: str) -> np.ndarray:
    """float64 array of a metadata column's text values (NaN for empty), or ManifestError naming
    the first line whose value is not a number."""
    try:
        return np.array([v if v else "nan" for v in values], dtype=np.float64)
    except ValueError:
        for value, line in zip(values, lines):
            _parse(column, value, f"manifest {path}, line {line}")
        raise


def read_manifest(path: str, root: Optional[str] = None) -> Manifest:
    """Reads a manifest CSV; relative paths resolve against ``root`` (default: the CSV's folder).

    The file is UTF-8 text, with or without a byte-order mark (as spreadsheet programs write it),
    with LF or CRLF line ends. ManifestError for anything else, naming the file (and the line).
    The rows are a :class:`ManifestRows` (columnar: 2M rows fit in a few hundred MB).
    """
    if os.path.isdir(path):
        raise ManifestError(f"manifest {path}: is a folder, not a CSV file")
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path}: no such file")
    root = os.path.abspath(root if root is not None else os.path.dirname(os.path.abspath(path)))
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            columns = next(reader, None)
            if not columns or "path" not in columns:
                raise ManifestError(f"manifest {path}: needs a header row with a 'path' column")
            width = len(columns)
            numeric = [i for i, c in enumerate(columns) if c in _FLOAT_COLUMNS or c in _INT_COLUMNS]
            textual = [i for i in range(width) if i not in numeric]
            text: Dict[str, list] = {columns[i]: [] for i in textual}
            chunks: Dict[str, List[np.ndarray]] = {columns[i]: [] for i in numeric}
            # one copy of each repeated value of a text column (labels), until a column proves mostly distinct
            shared: Dict[int, Dict[str, str]] = {i: {} for i in textual if columns[i] not in ("path", "audio_path")}
            path_at = columns.index("path")
            chunk: List[List[str]] = []
            lines: List[int] = []

            def flush() -> None:
                by_column = list(zip(*chunk))
                for i in textual:
                    values = by_column[i]
                    seen = shared.get(i)
                    if seen is None:
                        text[columns[i]].extend(v if v else None for v in values)
                        continue
                    text[columns[i]].extend(seen.setdefault(v, v) if v else None for v in values)
                    if len(seen) > _SHARED_VALUES:
                        del shared[i]
                for i in numeric:
                    chunks[columns[i]].append(_numbers(columns[i], by_column[i], lines, path))
                chunk.clear()
                lines.clear()

            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != width:
                    if len(row) > width:
                        if any(value.strip() for value in row[width:]):
                            raise ManifestError(f"manifest {path}, line {reader.line_num}: more fields than the "
                                                f"{width} columns of the header")
                        del row[width:]
                    else:
                        row.extend([""] * (width - len(row)))
                if not row[path_at]:
                    raise ManifestError(f"manifest {path}, line {reader.line_num}: empty 'path'")
                chunk.append(row)
                lines.append(reader.line_num)
                if len(chunk) == _CHUNK_ROWS:
                    flush()
            if chunk:
                flush()
    except UnicodeDecodeError as error:
        raise ManifestError(f"manifest {path}: not UTF-8 text (byte {error.start}: {error.reason}); is it a "
                            "CSV file? Save it as UTF-8") from None
    except csv.Error as error:
        where = f", line {reader.line_num}" if reader is not None else ""
        raise ManifestError(f"manifest {path}{where}: not valid CSV ({error})") from None
    except OSError as error:
        raise ManifestError(f"manifest {path}: cannot be read ({error.strerror or error})") from None
    if not text["path"]:
        raise ManifestError(f"manifest {path}: has a header but no rows")
    numbers = {name: np.concatenate(parts) for name, parts in chunks.items()}
    return Manifest(root=root, rows=ManifestRows(columns, text, numbers), columns=list(columns))


def check_files_exist(manifest: Manifest, name: str, root_option: str, sample: int = 8) -> None:
    """ManifestError when none of the first ``sample`` rows' files exists: the manifest's paths start
    from another folder than ``manifest.root``. ``name`` names the manifest, ``root_option`` the option
    that sets the folder (e.g. ``--set data.root``)."""
    rows = range(min(sample, len(manifest)))
    if any(os.path.exists(manifest.path(i)) for i in rows):
        return
    raise ManifestError(f"{name}: none of its first {len(rows)} files exists under {manifest.root} (e.g. "
                        f"{manifest.path(0)}); its paths start from another folder: {root_option}=VIDEO_DIR")


def write_manifest(path: str, rows: Sequence[Dict[str, object]], columns: Optional[Sequence[str]] = None) -> None:
    """Writes rows atomically, streaming (no copy of the whole text in memory); columns default to
    ``path``, ``label`` if any row has one, then the metadata columns."""
    if columns is None:
        present = set(rows.columns) if isinstance(rows, ManifestRows) else {k for r in rows for k in r}
        columns = ["path"] + [c for c in ("label",) + METADATA_COLUMNS if c in present]
        columns += sorted(present - set(columns))
    columns = list(columns)

    def write(binary) -> None:
        out = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if value is None else value for value in (r.get(k) for k in columns)])
        out.flush()
        out.detach()

    atomic_write(path, write)
