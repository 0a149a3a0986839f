"""Memory the training steps do not need, given back after set-up.

    release_unused_vae(models, group, unused) -> bool   drop the VAE when `unused` and every latent is cached
    return_freed_memory()                    glibc malloc_trim: hand freed heap pages back to the OS

The VAE (0.33 GiB fp32 for SD1.5, the same for SDXL) is used by latent caching, sample images (decode) and the
validation set (built before the loop, but `compute` puts the VAE in eval mode): it is dropped only with
--cache_latents, no --sample_prompts and no validation set. Text encoders are not dropped: with cached outputs the
step never runs them, but LoRA modules of the text encoder hook into their layers (the weights stay referenced).
"""
from __future__ import annotations

import ctypes
import gc
import logging

logger = logging.getLogger(__name__)


def release_unused_vae(models, group, unused: bool) -> bool:
    """`unused`: the caller knows nothing decodes or encodes again (--cache_latents, no sampling, no validation)."""
    if not unused:
        return False
    if not all(item.latents is not None or item.latents_path for item in group.training_items()):
        return False  # a batch with an uncached image encodes it in the step
    models.vae.to("meta")  # weights freed; config and structure stay (SDXL reads the VAE's scale factor per step)
    return_freed_memory()
    logger.info("latents cached and no sampling or validation: the VAE is released")
    return True


def return_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
