"""The index of a shard folder (``index.npz``): where every sample's members lie in which shard.

Stored by column (numpy arrays, no Python object per sample), so the index of millions of
samples loads in a second or so, takes a few tens of bytes per sample and is cheap to hand to
DataLoader workers: ``shard`` (int32) and ``slot`` (int64) per sample, and per member extension
(``exts``) the data ``offset`` and ``size`` in bytes (int64, -1 where a sample has no such member).
A JSON header (the shards' names and sizes, the classes, the manifest fingerprint) is stored in
the same file.
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from avidfast.errors import AvidfastError
from avidfast.files import atomic_write

INDEX_NAME = "index.npz"
INDEX_VERSION = 1
AUDIO_MEMBER_EXTENSIONS = ("wav", "flac")  # members holding extracted audio


class ShardError(AvidfastError, ValueError):
    """A shard folder that cannot be used: a missing or unreadable index or shard (named)."""


@dataclass(frozen=True)
class ShardSample:
    """One sample: its shard (position in ``ShardIndex.shards``), key, memory slot and members.

    ``members`` maps a member's extension (``mp4``, ``wav``, ``json``, ...) to (offset, size) in
    bytes of its data inside the shard file.
    """

    shard: int
    key: str
    slot: int
    members: Dict[str, Tuple[int, int]]


def sample_key(slot: int) -> str:
    """The tar key (member name without extension) of the sample of memory slot ``slot``."""
    return f"{slot:09d}"


class _Samples(Sequence):
    """The index's samples as :class:`ShardSample` objects, built on access."""

    def __init__(self, index: "ShardIndex"):
        self.index = index

    def __len__(self) -> int:
        return int(self.index.slot.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        index = self.index
        slot = int(index.slot[i])
        members = {ext: (int(index.offset[i, e]), int(index.size[i, e]))
                   for e, ext in enumerate(index.exts) if index.offset[i, e] >= 0}
        return ShardSample(int(index.shard[i]), sample_key(slot), slot, members)


@dataclass
class ShardIndex:
    """The shards of a folder (file names relative to it, sizes in bytes) and their samples, in
    the order they were written (a sample's number here is not its memory slot). ``classes``: the
    labels of the manifest written, in class-index order; ``fingerprint``: its
    :func:`~avidfast.data.manifest.manifest_fingerprint` (which video each memory slot holds).
    Per sample (N of them): ``shard`` (N,) int32, ``slot`` (N,) int64; ``offset`` and ``size``
    (N, len(exts)) int64 of each member's data, -1 where absent."""

    folder: str
    shards: List[Tuple[str, int]]
    classes: List[str]
    fingerprint: str
    exts: List[str]
    shard: np.ndarray
    slot: np.ndarray
    offset: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return int(self.slot.shape[0])

    @property
    def samples(self) -> Sequence[ShardSample]:
        return _Samples(self)

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.folder, self.shards[shard][0])

    def shard_sizes(self) -> List[int]:
        """Number of samples in each shard, in shard order."""
        return np.bincount(self.shard, minlength=len(self.shards)).tolist()

    def check_shards(self) -> None:
        """ShardError naming the first shard file that is missing or not a file."""
        for shard in range(len(self.shards)):
            path = self.shard_path(shard)
            if not os.path.isfile(path):
                raise ShardError(f"shard {path} listed in {os.path.join(self.folder, INDEX_NAME)} is missing; "
                                 "restore it, or rewrite the shards with `avidfast prepare ... --shards`")

    def save(self) -> None:
        """Writes ``index.npz`` atomically."""
        header = {"version": INDEX_VERSION, "classes": self.classes, "fingerprint": self.fingerprint,
                  "exts": self.exts, "shards": [[name, size] for name, size in self.shards]}
        arrays = {"header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
                  "shard": self.shard, "slot": self.slot, "offset": self.offset, "size": self.size}
        atomic_write(os.path.join(self.folder, INDEX_NAME), lambda f: np.savez(f, **arrays))


def build_index(folder: str, shards: List[Tuple[str, int]], classes: List[str], fingerprint: str,
                exts: List[str], shard: Sequence[int], slot: Sequence[int], members: np.ndarray) -> ShardIndex:
    """A ShardIndex of N samples in written order: ``shard`` and ``slot`` of each; ``members`` (M, 4)
    int64 rows of (sample number, position of the extension in ``exts``, data offset, size)."""
    count = len(slot)
    offset = np.full((count, len(exts)), -1, dtype=np.int64)
    size = np.full((count, len(exts)), -1, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64).reshape(-1, 4)
    offset[members[:, 0], members[:, 1]] = members[:, 2]
    size[members[:, 0], members[:, 1]] = members[:, 3]
    return ShardIndex(os.path.abspath(folder), shards, classes, fingerprint, list(exts),
                      np.asarray(shard, dtype=np.int32), np.asarray(slot, dtype=np.int64), offset, size)


def read_index(folder: str) -> ShardIndex:
    """Reads ``folder/index.npz`` (``folder`` may also be the index file itself) and checks that
    every shard it lists exists. ShardError naming the file for anything wrong."""
    if os.path.isfile(folder) and os.path.basename(folder) == INDEX_NAME:
        folder = os.path.dirname(folder)
    folder = os.path.abspath(folder)
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: no shard index; write shards with `avidfast prepare SRC OUT --shards` "
                         "and pass OUT/shards")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode("utf-8"))
            arrays = {name: data[name] for name in ("shard", "slot", "offset", "size")}
        if header.get("version") != INDEX_VERSION:
            raise ShardError(f"{path}: index version {header.get('version')}, this avidfast reads "
                             f"{INDEX_VERSION}; rewrite the shards with `avidfast prepare ... --shards`")
        shards = [(str(name), int(size)) for name, size in header["shards"]]
        index = ShardIndex(folder, shards, [str(c) for c in header["classes"]], str(header["fingerprint"]),
                           [str(e) for e in header["exts"]], arrays["shard"].astype(np.int32),
                           arrays["slot"].astype(np.int64), arrays["offset"].astype(np.int64),
                           arrays["size"].astype(np.int64))
    except ShardError:
        raise
    except (OSError, KeyError, TypeError, ValueError, IndexError) as error:
        raise ShardError(f"{path}: cannot be read as a shard index ({type(error).__name__}: {error}); rewrite the "
                         "shards with `avidfast prepare ... --shards`") from None
    count = len(index)
    if count == 0:
        raise ShardError(f"{path}: the index lists no samples")
    shapes_ok = (index.shard.shape == (count,) and index.offset.shape == index.size.shape == (count, len(index.exts)))
    if not shapes_ok or index.shard.min() < 0 or index.shard.max() >= len(shards):
        raise ShardError(f"{path}: malformed shard index (array shapes or shard numbers); rewrite the shards")
    if not np.array_equal(np.sort(index.slot), np.arange(count)):
        raise ShardError(f"{path}: the samples' memory slots are not 0..{count - 1}, each once; rewrite the shards")
    index.check_shards()
    return index
