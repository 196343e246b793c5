"""Reading one sample's members from the shards by index, with the shard files kept open."""
import io
import json
import os
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from avidfast.data.shards.index import AUDIO_MEMBER_EXTENSIONS, ShardError, ShardIndex, sample_key

OPEN_SHARDS = 4  # shard files each process keeps open (a worker reads a few shards at a time)


class MemberFile(io.BytesIO):
    """A member's bytes as a file object (what PyAV and ``wave`` open), named ``shard.tar:key.ext``."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name


class SampleReader:
    """Positioned reads of sample members; each process opens a shard once and keeps up to
    :data:`OPEN_SHARDS` open (least recently used closed first). ``opens`` counts the shard opens of
    this process. Safe to share among threads (DALI's reading threads). Pickles without its open
    files (for DataLoader workers)."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self.opens = 0
        self._files: "OrderedDict[int, int]" = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"index": self.index}

    def __setstate__(self, state):
        self.__init__(state["index"])

    def _descriptor(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is not None:
            self._files.move_to_end(shard)
            return fd
        path = self.index.shard_path(shard)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ShardError(f"shard {path} is missing (listed in the index); restore it, or rewrite the shards "
                             "with `avidfast prepare ... --shards`") from None
        self.opens += 1
        self._files[shard] = fd
        while len(self._files) > OPEN_SHARDS:
            _, old = self._files.popitem(last=False)
            os.close(old)
        return fd

    def name(self, sample: int, ext: Optional[str] = None) -> str:
        """``shard-000003.tar:000000042.mp4``-style name of a member (or of the sample)."""
        key = sample_key(int(self.index.slot[sample]))
        member = f"{key}.{ext}" if ext else key
        return f"{self.index.shard_path(int(self.index.shard[sample]))}:{member}"

    def _span(self, sample: int, ext: str) -> Tuple[int, int]:
        try:
            column = self.index.exts.index(ext)
        except ValueError:
            column = None
        if column is None or self.index.offset[sample, column] < 0:
            raise ValueError(f"{self.name(sample)} has no .{ext} member")
        return int(self.index.offset[sample, column]), int(self.index.size[sample, column])

    def read(self, sample: int, ext: str) -> bytes:
        """The data of member ``<key>.<ext>`` of ``sample`` (the sample's number in the index).
        ValueError when the sample has no such member or the shard ends before the member does."""
        offset, size = self._span(sample, ext)
        shard = int(self.index.shard[sample])
        with self._lock:  # a descriptor is not closed while another thread reads it
            data = os.pread(self._descriptor(shard), size, offset)
        if len(data) < size:
            raise ValueError(f"{self.name(sample, ext)}: shard truncated ({len(data)} of {size} bytes)")
        return data

    def _exts(self, sample: int) -> List[str]:
        return [ext for e, ext in enumerate(self.index.exts) if self.index.offset[sample, e] >= 0]

    def video_ext(self, sample: int) -> str:
        """Extension of the sample's video member."""
        for ext in self._exts(sample):
            if ext != "json" and ext not in AUDIO_MEMBER_EXTENSIONS:
                return ext
        raise ValueError(f"{self.name(sample)} has no video member")

    def audio_ext(self, sample: int) -> Optional[str]:
        """Extension of the sample's extracted audio member, None when its audio is in the video."""
        for ext in self._exts(sample):
            if ext in AUDIO_MEMBER_EXTENSIONS:
                return ext
        return None

    def metadata(self, sample: int) -> Dict[str, object]:
        """The sample's JSON member (memory slot ``index``, ``label``, metadata). ValueError when
        it is not a JSON object with an integer ``index``."""
        try:
            payload = json.loads(self.read(sample, "json"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{self.name(sample, 'json')}: not valid JSON ({error})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("index"), int):
            raise ValueError(f"{self.name(sample, 'json')}: no integer 'index' (memory slot)")
        return payload

    def member_file(self, sample: int, ext: str) -> MemberFile:
        return MemberFile(self.read(sample, ext), self.name(sample, ext))

    def close(self) -> None:
        with self._lock:
            while self._files:
                _, fd = self._files.popitem()
                os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
