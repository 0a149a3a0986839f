"""SHA-256 of model files for the LoRA metadata, remembered between runs and computed beside the load.

KS writes the SHA-256 of the whole base model (and of `--vae`) into every LoRA (`ss_new_sd_model_hash`, A1111's
"new" checkpoint hash), and hashes the file again on every run: one core reads and hashes 2 GiB for SD1.5 (1.5 s
here), 6.9 GiB for SDXL and 23 GiB for Flux. Two things make that free here:

* the digest is remembered per (real path, size, modification time in ns) in `sha256.json` under
  `$LORA_TRAINER_CACHE` (default `$XDG_CACHE_HOME/lora-trainer`, i.e. `~/.cache/lora-trainer`; A1111 keeps the
  same in its cache.json), so the next run on the same base model reads it back. A changed file has a new size or time and is hashed again.
  A cache that cannot be read or written is ignored: the hash is then computed, never skipped.
* a digest that is not cached yet is computed in a background thread from the start of the run (`prefetch`),
  while the models load and latents are cached; hashlib and file reads release the GIL, so on a GPU machine that
  time is otherwise idle. The thread is a daemon: a run that stops early does not wait for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading

_CHUNK = 1 << 20
_pending: dict[str, "_Hashing"] = {}  # real path -> a running background hash
_lock = threading.Lock()


def cache_path() -> str:
    """Where digests are remembered: $LORA_TRAINER_CACHE, else the XDG cache folder."""
    folder = os.environ.get("LORA_TRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lora-trainer")
    return os.path.join(folder, "sha256.json")


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes (no cache)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _identity(path: str) -> tuple[str, str]:
    """(cache key, real path): the key changes when the file's size or modification time does."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return f"{real}|{stat.st_size}|{stat.st_mtime_ns}", real


def _path_of(key: str) -> str:
    """The real path of a cache key (the path may itself contain "|"; size and time never do)."""
    return key.rsplit("|", 2)[0]


def _read_cache() -> dict[str, str]:
    try:
        with open(cache_path(), encoding="utf-8") as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(key: str, digest: str) -> None:
    """Add one digest; written to a temporary file and renamed, so readers never see half a file."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        entries = _read_cache()
        real = _path_of(key)
        entries = {k: v for k, v in entries.items() if _path_of(k) != real}  # older versions of this file
        entries[key] = digest
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".sha256-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=0, sort_keys=True)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only home: the digest is simply computed again next time


class _Hashing(threading.Thread):
    def __init__(self, path: str, key: str):
        super().__init__(name="sha256 " + os.path.basename(path), daemon=True)
        self.path, self.key = path, key
        self.digest: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.digest = file_sha256(self.path)
        except BaseException as e:  # reported to the caller of cached_sha256, which hashes again in its thread
            self.error = e


def prefetch(path: str) -> None:
    """Start hashing `path` in the background unless its digest is cached or being computed; folders and missing
    files are ignored (the metadata reports them itself)."""
    if not os.path.isfile(path):
        return
    key, real = _identity(path)
    with _lock:
        if real in _pending or key in _read_cache():
            return
        _pending[real] = hashing = _Hashing(real, key)
    hashing.start()


def cached_sha256(path: str) -> str:
    """The file's SHA-256: from the cache, from a background hash started by `prefetch`, or computed now; a
    computed digest is remembered."""
    key, real = _identity(path)
    with _lock:
        hashing = _pending.pop(real, None)
    if hashing is not None:
        hashing.join()
        if hashing.error is None and hashing.key == key:
            _remember(key, hashing.digest)
            return hashing.digest
    digest = _read_cache().get(key)
    if digest is None:
        digest = file_sha256(real)
        _remember(key, digest)
    return digest
