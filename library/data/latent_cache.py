"""On-disk caches beside the images: VAE latents and text-encoder outputs, as `.safetensors` files whose metadata
says exactly what they were computed from, so a stale file is recomputed instead of trained on.

KS writes `<stem>.npz` and reuses it after the VAE, the resolution or the image changed (stale latents). Here:
  latents:  `<stem>_<hash>.safetensors`, hash of (cache_key, image file name, bucket); the metadata holds
            cache_key (VAE weights hash + dtype, built by the caller), the image's file size and mtime, the bucket,
            the resize and the crop. Any difference -> recompute.
  text:     `<stem>_te_<hash>.safetensors`, hash of (cache_key, image file name); metadata holds cache_key and the
            exact caption text. Any difference -> recompute.
Files are written to a temporary name and renamed, so a crash never leaves a torn cache file.

The cache keys (`vae_cache_key`, `text_encoder_cache_key`) say what produced a cached tensor: a fast digest of
the weights that matter (the VAE encoder and quant_conv, not the decoder; every text encoder), their dtype, the
latent scaling, and the text options that change the outputs (clip_skip, token lengths, T5 on/off, masks).
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
DIGEST_SAMPLES = 4096   # elements read per tensor: any retrained or swapped weight differs in nearly all of them
VAE_ENCODER_PREFIXES = ("encoder.", "quant_conv.")   # what z = E(x) depends on; the decoder does not matter
# Options that change text-encoder outputs (read from the run's options when they exist there).
TEXT_OPTIONS = ("clip_skip", "max_token_length", "t5xxl_max_token_length", "apply_t5_attn_mask",
                "apply_lg_attn_mask", "t5xxl_dtype")


def weights_digest(named_tensors, samples: int = DIGEST_SAMPLES) -> str:
    """A fast digest of many tensors: each one's name, shape, dtype and `samples` evenly spaced elements
    (bytes of the values as stored). Reads a few MB even for a T5-XXL, on the tensors' own device."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1)
        if flat.numel() > samples:
            index = torch.linspace(0, flat.numel() - 1, samples, device=flat.device).long()
            flat = flat[index]
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vae_cache_key(family: str, vae: torch.nn.Module) -> str:
    """What a cached latent depends on: the family's latent formula, the VAE encoder weights and dtype, the
    scaling and shift factors."""
    config = getattr(vae, "config", {})
    scale = getattr(config, "scaling_factor", None) if not isinstance(config, dict) else config.get("scaling_factor")
    shift = getattr(config, "shift_factor", None) if not isinstance(config, dict) else config.get("shift_factor")
    encoder = [(n, t) for n, t in vae.state_dict().items() if n.startswith(VAE_ENCODER_PREFIXES)]
    weights = weights_digest(encoder)
    return f"{family}-vae-{weights[:16]}-{next(vae.parameters()).dtype}-s{scale}-f{shift}"


def text_encoder_cache_key(family: str, text_encoders: list, tokenizers: list, options) -> str:
    """What cached text-encoder outputs depend on: every text encoder's weights and dtype (an absent one, e.g.
    SD3 without T5, counts as 'none'), the tokenizers' vocabularies and lengths, and TEXT_OPTIONS."""
    parts = [family]
    for i, encoder in enumerate(text_encoders):
        if encoder is None:
            parts.append(f"te{i}:none")
            continue
        parts.append(f"te{i}:{weights_digest(encoder.state_dict().items())[:16]}:{next(encoder.parameters()).dtype}")
    for i, tokenizer in enumerate(tokenizers):
        if tokenizer is not None:
            parts.append(f"tok{i}:{type(tokenizer).__name__}:{len(tokenizer)}:{getattr(tokenizer, 'model_max_length', '')}")
    parts += [f"{name}={getattr(options, name)}" for name in TEXT_OPTIONS if hasattr(options, name)]
    return f"{family}-te-{hashlib.blake2b('|'.join(parts).encode(), digest_size=8).hexdigest()}"


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
