"""Writing a manifest's clips into tar shards plus their index (see :mod:`avidfast.data.shards`)."""
import io
import json
import os
import tarfile
from array import array
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from avidfast.data.manifest import METADATA_COLUMNS, Manifest, manifest_fingerprint
from avidfast.data.shards.index import (
    AUDIO_MEMBER_EXTENSIONS, INDEX_NAME, ShardError, ShardIndex, build_index, sample_key,
)
from avidfast.files import atomic_write

DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB
REQUIRED_METADATA = ("duration", "width", "height")
_SHARD_NAME = "shard-{:06d}.tar"
_WRITE_ORDER_SEED = 0


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lstrip(".").lower()


def _sample_json(manifest: Manifest, slot: int) -> bytes:
    row = manifest.rows[slot]
    payload = {"index": slot, "label": row.get("label"), "path": row["path"]}
    payload.update({column: row.get(column) for column in METADATA_COLUMNS if column != "audio_path"})
    return json.dumps(payload, sort_keys=True).encode("utf-8")


def _sample_members(manifest: Manifest, slot: int) -> List[Tuple[str, str, Optional[bytes]]]:
    """(extension, source file or "", bytes when not from a file) of the members of ``slot``."""
    video = manifest.path(slot)
    members = [(_extension(video), video, None)]
    if manifest.rows[slot].get("audio_path"):
        audio = manifest.audio_path(slot)
        ext = _extension(audio)
        if ext not in AUDIO_MEMBER_EXTENSIONS:
            raise ShardError(f"manifest row {slot}: audio_path {audio} is not WAV or FLAC; shards carry the audio "
                             "`avidfast prepare --extract-audio wav|flac` writes")
        members.append((ext, audio, None))
    members.append(("json", "", _sample_json(manifest, slot)))
    return members


def _check_manifest(manifest: Manifest) -> None:
    for slot, row in enumerate(manifest.rows):
        missing = [column for column in REQUIRED_METADATA if row.get(column) in (None, 0)]
        if missing:
            raise ShardError(f"manifest row {slot} ({manifest.path(slot)}): no {', '.join(missing)}; shards carry "
                             "the metadata avidfast prepare records, so write them from a prepared manifest")
        ext = _extension(manifest.path(slot))
        if not ext or ext == "json" or ext in AUDIO_MEMBER_EXTENSIONS:
            raise ShardError(f"manifest row {slot}: video {manifest.path(slot)} needs a video file extension")


class _IndexColumns:
    """The index entries of the samples written so far, as flat int64 arrays (a few tens of bytes a
    sample, however many millions there are)."""

    def __init__(self):
        self.exts: List[str] = []
        self.shard, self.slot, self.members = array("q"), array("q"), array("q")

    def add(self, shard: int, slot: int, spans: Dict[str, Tuple[int, int]]) -> None:
        sample = len(self.slot)
        self.shard.append(shard)
        self.slot.append(slot)
        for ext, (offset, size) in spans.items():
            if ext not in self.exts:
                self.exts.append(ext)
            self.members.extend((sample, self.exts.index(ext), offset, size))


def _write_shard(file: BinaryIO, slots: List[int], manifest: Manifest, shard: int, columns: _IndexColumns) -> None:
    """Writes the samples of ``slots`` as one tar into ``file``; adds their index entries."""
    with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for slot in slots:
            key = sample_key(slot)
            spans: Dict[str, Tuple[int, int]] = {}
            for ext, source, data in _sample_members(manifest, slot):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.mode, info.mtime = 0o644, 0
                info.size = os.path.getsize(source) if data is None else len(data)
                header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
                spans[ext] = (tar.offset + header, info.size)
                if data is None:
                    with open(source, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info, io.BytesIO(data))
            columns.add(shard, slot, spans)


def write_shards(manifest: Manifest, folder: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 progress: Optional[Callable[[int, int], None]] = None) -> ShardIndex:
    """Packs every row of ``manifest`` (a prepared one: with duration, width and height) into tar
    shards of at most ``shard_bytes`` bytes in ``folder`` and writes ``folder/index.npz``.

    Rows go into the shards in a fixed pseudo-random order (seed 0), so each shard is a mix of the
    data set. Every shard is written to a temporary file and renamed when complete, the index
    last: an interrupted run leaves the previous index (if any) naming complete shards. Shard files
    of an earlier run that the new index does not list are removed. ``progress(done, total)`` is
    called after each shard. Returns the index.
    """
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    _check_manifest(manifest)
    generator = torch.Generator().manual_seed(_WRITE_ORDER_SEED)
    order = torch.randperm(len(manifest), generator=generator).tolist()
    groups: List[List[int]] = [[]]
    filled = 0
    for slot in order:
        size = sum(1024 + (os.path.getsize(source) if data is None else len(data))
                   for _, source, data in _sample_members(manifest, slot))
        if groups[-1] and filled + size > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(slot)
        filled += size
    os.makedirs(folder, exist_ok=True)
    columns = _IndexColumns()
    shards: List[Tuple[str, int]] = []
    for shard, slots in enumerate(groups):
        name = _SHARD_NAME.format(shard)
        atomic_write(os.path.join(folder, name), lambda f: _write_shard(f, slots, manifest, shard, columns))
        shards.append((name, os.path.getsize(os.path.join(folder, name))))
        if progress is not None:
            progress(shard + 1, len(groups))
    index = build_index(folder, shards, manifest.classes, manifest_fingerprint(manifest), columns.exts, columns.shard,
                        columns.slot, np.frombuffer(columns.members, dtype=np.int64))
    index.save()
    listed = {name for name, _ in shards} | {INDEX_NAME}
    for name in os.listdir(folder):
        if name.startswith("shard-") and name.endswith(".tar") and name not in listed:
            os.unlink(os.path.join(folder, name))
    return index
