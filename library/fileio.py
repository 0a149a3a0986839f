"""Atomic file writes: a crash never leaves a torn LoRA, cache or state file under its final name.

Temporary files are hidden siblings `.<final name>.<random>.tmp`; `remove_stale_temp_files` clears the ones a
kill -9 left behind. `write_error_message` turns a failed write (disk full, read-only, quota) into one line.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
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


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def remove_stale_temp_files(folder: str, name: str) -> list[str]:
    """Remove what an interrupted save of `name` (a kill -9, a power cut) left in `folder`: hidden
    `.<name>*.<random>.tmp[.ext]` files and `<name>*-state.tmp` folders; a `<name>*-state.old` folder (the previous
    state, moved aside during a save) is put back when its state folder is missing, else removed.
    Returns the paths removed or restored. Only files of this `--output_name` are touched (another run may be
    writing its own files in the same folder)."""
    if not os.path.isdir(folder):
        return []
    touched = []
    hidden_tmp = re.compile(r"^\." + re.escape(name) + r".*\.[A-Za-z0-9_]{6,}\.tmp(\.\w+)?$")  # atomic_write's names
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if hidden_tmp.match(entry) and os.path.isfile(path):
            os.remove(path)
            touched.append(path)
        elif entry.startswith(name) and entry.endswith("-state.tmp") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            touched.append(path)
        elif entry.startswith(name) and entry.endswith("-state.old") and os.path.isdir(path):
            final = path[:-len(".old")]
            if os.path.exists(final):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)
            touched.append(path)
    return touched


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return shutil.disk_usage(path).free


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_error_message(exc: BaseException, path: str) -> str:
    """One line for a failed write: what failed, why, and (disk full) how much room is left."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return f"writing {path} failed: the disk is full ({mib(free_bytes(folder))} free in {folder})"
    if code == errno.EDQUOT or "quota" in text.lower():
        return f"writing {path} failed: disk quota exceeded in {folder}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text or "Read-only" in text:
        return f"writing {path} failed: {folder} is not writable ({getattr(exc, 'strerror', None) or text})"
    return f"writing {path} failed: {getattr(exc, 'strerror', None) or text}"
