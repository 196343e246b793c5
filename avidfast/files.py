"""Atomic file output, the one implementation every writer of avidfast uses.

A file is written to a temporary file beside the target (same folder, so the rename cannot cross
file systems), flushed and fsynced, renamed over the target with os.replace, and the folder is
fsynced so that the rename itself survives a crash. Readers see either the old file or the whole
new one, never a partial write. The temporary file is created with mode 0o666 so the kernel
applies the umask (and any default ACL) exactly as for a plain new file: the result gets the
permissions ``open(path, "w")`` would give it.
"""
import os
import secrets
from typing import BinaryIO, Callable

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_temporary(directory: str, name: str):
    """(file descriptor, path) of a new, empty, uniquely named file ``.<name>.<random>.tmp``."""
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue


def _fsync_directory(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the data itself is synced
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Creates or replaces ``path`` with what ``write`` writes to the binary file it is given.

    The folder is created when missing. If ``write`` (or anything before the rename) raises, the
    temporary file is removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temporary(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def atomic_write_text(path: str, text: str) -> None:
    """Writes text (UTF-8) to path so that readers see either the old file or the whole new one."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
