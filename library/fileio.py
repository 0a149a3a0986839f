"""Atomic file writes: a crash never leaves a torn LoRA, cache or state file under its final name."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """write(tmp) to a temporary file in the same folder, fsync, then os.replace: a crash or an exception
    midway leaves the previous file (if any) untouched and no partial file under `path`. `suffix` ends the
    temporary name (for writers that pick a format from the extension)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # temp files are 0600; the LoRA gets the permissions of a normal file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
