"""Where dapeng keeps files, and how it writes them: every package below may use these."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def dapeng_home() -> Path:
    """The cache root: `$DAPENG_HOME`, else `~/.cache/dapeng`."""
    return Path(os.environ.get("DAPENG_HOME") or Path.home() / ".cache" / "dapeng").expanduser()


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)
