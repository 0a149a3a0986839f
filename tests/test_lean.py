"""library/lean.py: the VAE is released only when nothing needs it again."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from library import lean


def _run(validation=None, latents=True):
    item = SimpleNamespace(latents=torch.zeros(4, 8, 8) if latents else None, latents_path=None)
    group = SimpleNamespace(training_items=lambda: [item])
    return SimpleNamespace(models=SimpleNamespace(vae=torch.nn.Linear(2, 2)), group=group, validation=validation)


def test_vae_released_only_with_every_latent_cached_and_no_sampling_or_validation():
    cached = SimpleNamespace(cache_latents=True, sample_prompts=None)
    run = _run()
    assert lean.release_unused_vae(cached, run) and run.models.vae is None
    for args, run in ((SimpleNamespace(cache_latents=False, sample_prompts=None), _run()),
                      (SimpleNamespace(cache_latents=True, sample_prompts="prompts.txt"), _run()),
                      (cached, _run(validation=object())),
                      (cached, _run(latents=False))):
        assert not lean.release_unused_vae(args, run) and run.models.vae is not None
