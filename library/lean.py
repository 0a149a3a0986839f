"""Memory the training steps do not need, given back after set-up.

    release_unused_vae(models, group, unused) -> bool   drop the VAE when `unused` and every latent is cached

The VAE (0.33 GiB fp32 for SD1.5, the same for SDXL) is used by latent caching, sample images (decode) and the
validation set (built before the loop, but `compute` puts the VAE in eval mode): it is dropped only with
--cache_latents, no --sample_prompts and no validation set. Text encoders are not dropped: with cached outputs the
step never runs them, but LoRA modules of the text encoder hook into their layers (the weights stay referenced).
"""
from __future__ import annotations

import logging

from library.host_memory import trim_heap

logger = logging.getLogger(__name__)


def release_unused_vae(models, group, unused: bool) -> bool:
    """`unused`: the caller knows nothing decodes or encodes again (--cache_latents, no sampling, no validation)."""
    if not unused:
        return False
    if not all(item.latents is not None or item.latents_path for item in group.training_items()):
        return False  # a batch with an uncached image encodes it in the step
    models.vae.to("meta")  # weights freed; config and structure stay (SDXL reads the VAE's scale factor per step)
    trim_heap()
    logger.info("latents cached and no sampling or validation: the VAE is released")
    return True

