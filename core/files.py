"""Atomic file writes: a reader (or a rerun after a crash) never sees a half-written file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from core.errors import ConfigError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temp file beside `path`; on success it replaces `path` (os.replace, atomic on one
    file system), on an exception it is deleted and `path` is left as it was.

    The temp file is named `.<name>.<random>.tmp` in the same folder, so a crash can be cleaned
    up by name and the rename never crosses file systems.
    """
    if "w" not in mode:
        raise ConfigError(f"atomic_write needs a write mode, not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
