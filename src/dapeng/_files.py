"""Where dapeng keeps files, and how it writes them: every package may use these.

Every write that must not tear goes through `atomic_write` (a callback writes the bytes) or
`atomic_path` (a library writes to a path): the data goes to a temp file in the same folder,
is fsync'd, then `os.replace`d over the old file, and the folder entry is synced. A process
killed at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_write", "dapeng_home", "fsync_dir"]

# mkstemp makes files private (0600); what dapeng writes (runs, reports, caches) is meant to be read
FILE_MODE = 0o644


def dapeng_home() -> Path:
    """The cache root: `$DAPENG_HOME`, else `~/.cache/dapeng`."""
    return Path(os.environ.get("DAPENG_HOME") or Path.home() / ".cache" / "dapeng").expanduser()


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; sync it and rename it onto `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            _fsync_file(tmp_path)
            os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(binary_file)` on a temp file next to `path`, then move it into place atomically.

    A failed `write` leaves `path` untouched (and no temp file behind).
    """
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        write(f)
    return path


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename durable by syncing the folder entry (a no-op where folders can't be opened)."""
    _fsync_file(Path(folder))
