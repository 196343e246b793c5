"""The index of a shard folder (``index.json``): where every sample's members lie in which shard."""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

from avidfast.errors import AvidfastError
from avidfast.files import atomic_write_text

INDEX_NAME = "index.json"
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


@dataclass
class ShardIndex:
    """The shards of a folder (file names relative to it, sizes in bytes) and their samples, in
    the order they were written (a sample's number here is not its memory slot). ``classes``: the
    labels of the manifest written, in class-index order; ``fingerprint``: its
    :func:`~avidfast.data.manifest.manifest_fingerprint` (which video each memory slot holds)."""

    folder: str
    shards: List[Tuple[str, int]]
    samples: List[ShardSample]
    classes: List[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.samples)

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.folder, self.shards[shard][0])

    def shard_sizes(self) -> List[int]:
        """Number of samples in each shard, in shard order."""
        counts = [0] * len(self.shards)
        for sample in self.samples:
            counts[sample.shard] += 1
        return counts

    def check_shards(self) -> None:
        """ShardError naming the first shard file that is missing or not a file."""
        for shard, (name, _) in enumerate(self.shards):
            path = self.shard_path(shard)
            if not os.path.isfile(path):
                raise ShardError(f"shard {path} listed in {os.path.join(self.folder, INDEX_NAME)} is missing; "
                                 "restore it, or rewrite the shards with `avidfast prepare ... --shards`")

    def save(self) -> None:
        """Writes ``index.json`` atomically."""
        payload = {
            "version": INDEX_VERSION, "classes": self.classes, "fingerprint": self.fingerprint, "shards": [[name, size] for name, size in self.shards],
            "samples": [[s.shard, s.key, s.slot, {ext: list(span) for ext, span in s.members.items()}]
                        for s in self.samples],
        }
        atomic_write_text(os.path.join(self.folder, INDEX_NAME), json.dumps(payload, separators=(",", ":")) + "\n")


def read_index(folder: str) -> ShardIndex:
    """Reads ``folder/index.json`` (``folder`` may also be the index file itself) and checks that
    every shard it lists exists. ShardError naming the file for anything wrong."""
    if os.path.isfile(folder) and os.path.basename(folder) == INDEX_NAME:
        folder = os.path.dirname(folder)
    folder = os.path.abspath(folder)
    path = os.path.join(folder, INDEX_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"{path}: no shard index; write shards with `avidfast prepare SRC OUT --shards` "
                         "and pass OUT/shards") from None
    except (OSError, ValueError) as error:
        raise ShardError(f"{path}: cannot be read as a shard index ({error})") from None
    try:
        if payload.get("version") != INDEX_VERSION:
            raise ShardError(f"{path}: index version {payload.get('version')}, this avidfast reads "
                             f"{INDEX_VERSION}; rewrite the shards with `avidfast prepare ... --shards`")
        shards = [(str(name), int(size)) for name, size in payload["shards"]]
        samples = [ShardSample(int(shard), str(key), int(slot),
                               {str(ext): (int(span[0]), int(span[1])) for ext, span in members.items()})
                   for shard, key, slot, members in payload["samples"]]
        index = ShardIndex(folder, shards, samples, [str(c) for c in payload["classes"]], str(payload["fingerprint"]))
    except (KeyError, TypeError, ValueError, IndexError) as error:
        if isinstance(error, ShardError):
            raise
        raise ShardError(f"{path}: malformed shard index ({type(error).__name__}: {error}); rewrite the shards "
                         "with `avidfast prepare ... --shards`") from None
    if not samples:
        raise ShardError(f"{path}: the index lists no samples")
    if any(not 0 <= s.shard < len(shards) for s in samples):
        raise ShardError(f"{path}: a sample names a shard the index does not list; rewrite the shards")
    if sorted(s.slot for s in samples) != list(range(len(samples))):
        raise ShardError(f"{path}: the samples' memory slots are not 0..{len(samples) - 1}, each once; rewrite the "
                         "shards")
    index.check_shards()
    return index
