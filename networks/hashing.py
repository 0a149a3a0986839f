"""Model hashes of a LoRA file, computed exactly as kohya sd-scripts does (sshs_model_hash, sshs_legacy_hash).

Source: kohya-ss/sd-scripts library/train_util.py `addnet_hash_legacy`, `addnet_hash_safetensors`,
`precalculate_safetensors_hashes` (the hashes of sd-webui-additional-networks). A1111 / Forge / the
additional-networks extension read them from the metadata instead of rehashing the file.
"""
from __future__ import annotations

import hashlib
from io import BytesIO
from typing import BinaryIO

import torch

LEGACY_HASH_OFFSET = 0x100000  # 1 MiB: the legacy hash reads 64 KiB starting here
LEGACY_HASH_LENGTH = 0x10000
_BLOCK = 1024 * 1024


def addnet_hash_legacy(b: BinaryIO) -> str:
    """sha256(bytes[0x100000 : 0x110000])[:8]; a file shorter than 1 MiB hashes b"" (-> 'e3b0c442')."""
    m = hashlib.sha256()
    b.seek(LEGACY_HASH_OFFSET)
    m.update(b.read(LEGACY_HASH_LENGTH))
    return m.hexdigest()[0:8]


def addnet_hash_safetensors(b: BinaryIO) -> str:
    """sha256 of everything after the safetensors header (8-byte little-endian length n, then n bytes of JSON).

    The tensor bytes only: so editing user metadata does not change the hash."""
    h = hashlib.sha256()
    b.seek(0)
    header_len = int.from_bytes(b.read(8), "little")
    b.seek(header_len + 8)
    for chunk in iter(lambda: b.read(_BLOCK), b""):
        h.update(chunk)
    return h.hexdigest()


def precalculate_safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(model_hash, legacy_hash) of the file that `tensors` + the `ss_*` part of `metadata` serialise to.

    KS keeps only the training metadata (`ss_*`) for the hash, as sd-webui-additional-networks does, so user
    metadata cannot change it. The legacy hash therefore depends on the `ss_*` header size (KS behaviour)."""
    from safetensors.torch import save

    training_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(save(tensors, training_metadata))
    return addnet_hash_safetensors(b), addnet_hash_legacy(b)
