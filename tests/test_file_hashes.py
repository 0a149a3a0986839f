"""Model-file SHA-256 for the metadata (library/file_hashes.py): remembered per path, size and time; computed in a
background thread when not remembered; never wrong when the cache is missing, damaged or read-only."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading

import pytest

from library import file_hashes, metadata


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    folder = tmp_path / "cache"
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(folder))
    return str(folder / "sha256.json")


@pytest.fixture
def model(tmp_path) -> str:
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 * (1 << 20) + 12345))  # more than one read chunk, not a multiple of it
    return str(path)


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _calls(monkeypatch) -> list[str]:
    """Record which thread computes each digest."""
    calls, compute = [], file_hashes.file_sha256

    def recorded(path):
        calls.append(threading.current_thread().name)
        return compute(path)

    monkeypatch.setattr(file_hashes, "file_sha256", recorded)
    return calls


def test_digest_is_remembered_and_read_back(cache, model, monkeypatch):
    calls = _calls(monkeypatch)
    assert file_hashes.cached_sha256(model) == _sha(model)
    assert len(calls) == 1
    entries = json.load(open(cache))
    assert list(entries.values()) == [_sha(model)]
    assert file_hashes.cached_sha256(model) == _sha(model)  # the second run reads it
    assert len(calls) == 1


def test_changed_file_is_hashed_again_and_replaces_its_entry(cache, model, monkeypatch):
    calls = _calls(monkeypatch)
    first = file_hashes.cached_sha256(model)
    with open(model, "ab") as f:
        f.write(b"x")
    assert file_hashes.cached_sha256(model) == _sha(model) != first
    assert len(calls) == 2
    assert list(json.load(open(cache)).values()) == [_sha(model)]  # one entry per file


def test_same_size_rewrite_changes_the_time_and_is_hashed_again(cache, model, monkeypatch):
    file_hashes.cached_sha256(model)
    data = bytearray(open(model, "rb").read())
    data[0] ^= 0xFF
    with open(model, "wb") as f:
        f.write(data)
    stat = os.stat(model)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse clocks: force a new time
    assert file_hashes.cached_sha256(model) == _sha(model)


def test_damaged_cache_is_ignored_and_rewritten(cache, model):
    os.makedirs(os.path.dirname(cache))
    with open(cache, "w") as f:
        f.write("{not json")
    assert file_hashes.cached_sha256(model) == _sha(model)
    assert list(json.load(open(cache)).values()) == [_sha(model)]


def test_unwritable_cache_still_gives_the_digest(tmp_path, model, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(blocker / "cache"))  # a folder below a file cannot exist
    assert file_hashes.cached_sha256(model) == _sha(model)


def test_prefetch_hashes_in_a_background_thread(cache, model, monkeypatch):
    calls = _calls(monkeypatch)
    file_hashes.prefetch(model)
    assert file_hashes.cached_sha256(model) == _sha(model)
    assert calls == ["sha256 model.safetensors"]  # computed once, not in the main thread
    file_hashes.prefetch(model)  # remembered now: no second thread
    assert len(calls) == 1 and os.path.realpath(model) not in file_hashes._pending


def test_prefetch_ignores_folders_and_missing_paths(cache, tmp_path):
    file_hashes.prefetch(str(tmp_path))
    file_hashes.prefetch(str(tmp_path / "missing.safetensors"))
    assert not any(path.startswith(os.path.realpath(tmp_path)) for path in file_hashes._pending)


def test_metadata_hashes_come_from_the_cache_and_no_metadata_hashes_nothing(cache, model, monkeypatch):
    calls = _calls(monkeypatch)
    keys = metadata._model_file_keys(model, "sd_model")
    assert keys["ss_new_sd_model_hash"] == _sha(model) and keys["ss_sd_model_name"] == "model.safetensors"
    metadata._model_file_keys(model, "sd_model")
    assert len(calls) == 1
    assert metadata._model_file_keys(model, "sd_model", no_metadata=True) == {"ss_sd_model_name": "model.safetensors"}
    args = argparse.Namespace(no_metadata=True, pretrained_model_name_or_path=model, vae=None)
    os.remove(cache)
    metadata.prefetch_model_hashes(args)
    assert os.path.realpath(model) not in file_hashes._pending and len(calls) == 1


def test_paths_with_a_bar_keep_their_own_entries(cache, tmp_path, monkeypatch):
    """The cache key is path|size|time: a "|" in the path must not make two files one (nor evict each other)."""
    paths = []
    for name, data in (("a|b", b"first"), ("a|c", b"second!")):
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name / "model.safetensors"))
        with open(paths[-1], "wb") as f:
            f.write(data)
        file_hashes.cached_sha256(paths[-1])
    calls = _calls(monkeypatch)
    assert [file_hashes.cached_sha256(p) for p in paths] == [_sha(p) for p in paths]
    assert calls == []  # both still remembered
    assert sorted(json.load(open(cache)).values()) == sorted(_sha(p) for p in paths)
