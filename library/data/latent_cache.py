"""On-disk caches beside the images: VAE latents and text-encoder outputs, as `.safetensors` files whose metadata
says exactly what they were computed from, so a stale file is recomputed instead of trained on.

KS writes `<stem>.npz` and reuses it after the VAE, the resolution or the image changed (stale latents). Here:
  latents:  `<stem>_<hash>.safetensors`, hash of (cache_key, image file name, bucket); the metadata holds
            cache_key (VAE weights hash + dtype, built by the caller), the image's file size and mtime, the bucket,
            the resize and the crop. Any difference -> recompute.
  text:     `<stem>_te_<hash>.safetensors`, hash of (cache_key, image file name); metadata holds cache_key and the
            exact caption text. Any difference -> recompute.
Files are written to a temporary name and renamed, so a crash never leaves a torn cache file.
"""
from __future__ import annotations

import hashlib
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.fileio import atomic_write

LATENT_FORMAT = "latents-v1"
TEXT_FORMAT = "text-encoder-outputs-v1"


def _short_hash(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()[:10]


def latent_cache_path(image_path: str, cache_key: str, bucket_wh: tuple[int, int]) -> str:
    stem = os.path.splitext(image_path)[0]
    name = os.path.basename(image_path)
    return f"{stem}_{_short_hash(cache_key, name, f'{bucket_wh[0]}x{bucket_wh[1]}')}.safetensors"


def text_cache_path(image_path: str, cache_key: str) -> str:
    stem = os.path.splitext(image_path)[0]
    return f"{stem}_te_{_short_hash(cache_key, os.path.basename(image_path))}.safetensors"


def latent_identity(cache_key: str, image_path: str, file_size: int, mtime_ns: int, bucket_wh: tuple[int, int],
                    resized_wh: tuple[int, int], crop_left_top: tuple[int, int]) -> dict[str, str]:
    """What a latent was computed from; all of it must match for the cache to be reused."""
    return {
        "format": LATENT_FORMAT, "cache_key": cache_key, "image_file": os.path.basename(image_path),
        "image_size_bytes": str(file_size), "image_mtime_ns": str(mtime_ns),
        "bucket_wh": f"{bucket_wh[0]},{bucket_wh[1]}", "resized_wh": f"{resized_wh[0]},{resized_wh[1]}",
        "crop_left_top": f"{crop_left_top[0]},{crop_left_top[1]}",
    }


def text_identity(cache_key: str, caption: str) -> dict[str, str]:
    return {"format": TEXT_FORMAT, "cache_key": cache_key, "caption": caption}


def load_if_valid(path: str, identity: dict[str, str] | None) -> dict[str, torch.Tensor] | None:
    """The cached tensors if `path` exists, is readable and its metadata equals `identity` (None: not checked,
    KS --skip_cache_check); else None."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if identity is not None and (f.metadata() or {}) != identity:
                return None
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception:  # a torn or foreign file is just a cache miss  # noqa: BLE001
        return None


def save_atomic(path: str, tensors: dict[str, torch.Tensor], identity: dict[str, str]) -> None:
    """Write via a temporary file and rename (atomic on POSIX)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=identity))
