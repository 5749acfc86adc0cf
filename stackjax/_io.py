"""Files stackjax writes: whole or not at all."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | Path, write: Callable[[IO], None], *, binary: bool = True) -> Path:
    """Write a file through a temporary sibling, fsync it, then rename it into place.

    A crash leaves either the old file or the new one, never half of either.

    Arguments:
        path: the destination (its folder is created if missing).
        write: called with the open temporary file.
        binary: open in binary (default) or text mode.

    Returns:
        The destination path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if binary else "w"
    with tempfile.NamedTemporaryFile(mode, dir=target.parent, delete=False, suffix=".tmp") as handle:
        try:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            os.unlink(handle.name)
            raise
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, target)
    return target
