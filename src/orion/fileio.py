"""Durable file writes, used wherever a file matters (programs, weights, caches, checkpoints, reports): write to a
temp file in the same folder, fsync, rename over the target, fsync the folder. A crash leaves the old file or the
new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from orion.errors import OrionError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (created files, renames) durable; filesystems that refuse are tolerated."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_new_file(path: str | os.PathLike, data: bytes) -> None:
    """Create ``path`` (never overwriting) and make its bytes durable, for files inside a folder that is itself
    renamed into place once complete (cache entries, checkpoints)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file (``"wb"`` or ``"w"``, UTF-8) that appears at ``path`` only when the block ends without error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OrionError(f"cannot write {path} ({e.strerror or e}); choose a writable folder") from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_write(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
