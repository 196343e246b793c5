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
from typing import Dict, List, Optional, Sequence

from avidfast.errors import AvidfastError
from avidfast.files import atomic_write_text

LABELS_SEPARATOR = ";"
METADATA_COLUMNS = ("duration", "fps", "width", "height", "sample_rate", "channels", "audio_duration", "audio_path")
_FLOAT_COLUMNS = {"duration", "fps", "audio_duration"}
_INT_COLUMNS = {"width", "height", "sample_rate", "channels"}


class ManifestError(AvidfastError, ValueError):
    """A manifest that cannot be read: the message names the file and the row."""


@dataclass
class Manifest:
    """Rows of a manifest and the root its relative paths resolve against.

    ``rows[i]`` is a dict of column -> value (numbers parsed for the metadata columns, ``None``
    where empty). Row i is memory slot i.
    """

    root: str
    rows: List[Dict[str, object]]
    columns: List[str] = field(default_factory=lambda: ["path"])

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, i: int) -> str:
        """Absolute path of row i's video."""
        return os.path.join(self.root, str(self.rows[i]["path"]))

    def audio_path(self, i: int) -> str:
        """Absolute path of row i's extracted audio if it has one, else of its video."""
        extracted = self.rows[i].get("audio_path")
        return os.path.join(self.root, str(extracted)) if extracted else self.path(i)

    @property
    def has_labels(self) -> bool:
        return "label" in self.columns and all(r.get("label") not in (None, "") for r in self.rows)

    @property
    def classes(self) -> List[str]:
        """Distinct labels of the labelled rows in natural order (integers by value, then names): a
        label's class index is its position here, in every protocol. ``[]`` without a label column."""
        if "label" not in self.columns:
            return []
        return sorted({str(r["label"]) for r in self.rows if r.get("label") not in (None, "")}, key=_natural_key)

    def label_indices(self, classes: Optional[Sequence[str]] = None, unlabelled: Optional[int] = None) -> List[int]:
        """Class index of every row: its position in ``classes`` (default: this manifest's own
        ``classes``; pass the training manifest's to index a test manifest the same way). Every row
        needs a label, unless ``unlabelled`` is given: rows without one then get that value (e.g. -1)."""
        if not (self.has_labels or (unlabelled is not None and "label" in self.columns)):
            raise ManifestError("this manifest has no 'label' column (or some rows have no label)")
        lookup = {str(name): i for i, name in enumerate(self.classes if classes is None else classes)}
        labelled = [str(r["label"]) if r.get("label") not in (None, "") else None for r in self.rows]
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
    for row in manifest.rows:
        path = str(row["path"])
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


def read_manifest(path: str, root: Optional[str] = None) -> Manifest:
    """Reads a manifest CSV; relative paths resolve against ``root`` (default: the CSV's folder).

    The file is UTF-8 text, with or without a byte-order mark (as spreadsheet programs write it),
    with LF or CRLF line ends. ManifestError for anything else, naming the file (and the line).
    """
    if os.path.isdir(path):
        raise ManifestError(f"manifest {path}: is a folder, not a CSV file")
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path}: no such file")
    root = os.path.abspath(root if root is not None else os.path.dirname(os.path.abspath(path)))
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, strict=True)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ManifestError(f"manifest {path}: needs a header row with a 'path' column")
            columns = list(reader.fieldnames)
            rows = []
            for line, raw in enumerate(reader, start=2):
                extra = raw.pop(None, None)  # fields beyond the header's columns
                if extra and any(field.strip() for field in extra):
                    raise ManifestError(f"manifest {path}, line {line}: more fields than the {len(columns)} "
                                        "columns of the header")
                if not raw.get("path"):
                    raise ManifestError(f"manifest {path}, line {line}: empty 'path'")
                rows.append({k: _parse(k, v or "", f"manifest {path}, line {line}") for k, v in raw.items()})
    except UnicodeDecodeError as error:
        raise ManifestError(f"manifest {path}: not UTF-8 text (byte {error.start}: {error.reason}); is it a "
                            "CSV file? Save it as UTF-8") from None
    except csv.Error as error:
        where = f", line {reader.line_num}" if reader is not None else ""
        raise ManifestError(f"manifest {path}{where}: not valid CSV ({error})") from None
    except OSError as error:
        raise ManifestError(f"manifest {path}: cannot be read ({error.strerror or error})") from None
    if not rows:
        raise ManifestError(f"manifest {path}: has a header but no rows")
    return Manifest(root=root, rows=rows, columns=columns)


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
    """Writes rows atomically; columns default to ``path``, ``label`` if any row has one, metadata."""
    if columns is None:
        present = {k for r in rows for k in r}
        columns = ["path"] + [c for c in ("label",) + METADATA_COLUMNS if c in present]
        columns += sorted(present - set(columns))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(path, out.getvalue())
