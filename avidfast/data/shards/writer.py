"""Writing a manifest's clips into tar shards plus their index (see :mod:`avidfast.data.shards`)."""
import io
import json
import os
import tarfile
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import torch

from avidfast.data.manifest import METADATA_COLUMNS, Manifest, manifest_fingerprint
from avidfast.data.shards.index import AUDIO_MEMBER_EXTENSIONS, INDEX_NAME, ShardError, ShardIndex, ShardSample
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


def _write_shard(file: BinaryIO, slots: List[int], manifest: Manifest, shard: int,
                 samples: List[ShardSample]) -> None:
    """Writes the samples of ``slots`` as one tar into ``file``; appends their index entries."""
    with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for slot in slots:
            key = f"{slot:09d}"
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
            samples.append(ShardSample(shard, key, slot, spans))


def write_shards(manifest: Manifest, folder: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 progress: Optional[Callable[[int, int], None]] = None) -> ShardIndex:
    """Packs every row of ``manifest`` (a prepared one: with duration, width and height) into tar
    shards of at most ``shard_bytes`` bytes in ``folder`` and writes ``folder/index.json``.

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
    samples: List[ShardSample] = []
    shards: List[Tuple[str, int]] = []
    for shard, slots in enumerate(groups):
        name = _SHARD_NAME.format(shard)
        atomic_write(os.path.join(folder, name), lambda f: _write_shard(f, slots, manifest, shard, samples))
        shards.append((name, os.path.getsize(os.path.join(folder, name))))
        if progress is not None:
            progress(shard + 1, len(groups))
    index = ShardIndex(os.path.abspath(folder), shards, samples, manifest.classes, manifest_fingerprint(manifest))
    index.save()
    listed = {name for name, _ in shards} | {INDEX_NAME}
    for name in os.listdir(folder):
        if name.startswith("shard-") and name.endswith(".tar") and name not in listed:
            os.unlink(os.path.join(folder, name))
    return index
