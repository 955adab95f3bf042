"""Writing secrets to disk: readable by their owner only, and never half-written.

A secret file is written to a new temporary file in the same directory, created with mode
0600 (and ``fchmod`` to 0600 again, whatever the umask), flushed to disk, and renamed over the
target. The rename replaces a pre-existing file's inode, so a target that existed with a wider
mode (say 0644) ends up 0600 too, and a reader sees the old content or the new, never a part.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: Path, data: bytes) -> None:
    """Atomically writes ``data`` to ``path`` with mode 0600 (see the module docstring)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), PRIVATE_MODE)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def is_private(path: Path) -> bool:
    """Whether ``path`` is readable and writable by its owner only."""
    return stat.S_IMODE(Path(path).stat().st_mode) & 0o077 == 0


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
