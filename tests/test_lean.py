"""library/lean.py: the VAE is released only when nothing needs it again."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from library import lean


def _run(latents=True):
    item = SimpleNamespace(latents=torch.zeros(4, 8, 8) if latents else None, latents_path=None)
    group = SimpleNamespace(training_items=lambda: [item])
    return SimpleNamespace(models=SimpleNamespace(vae=torch.nn.Linear(2, 2)), group=group)


def test_vae_released_only_when_unused_and_every_latent_is_cached():
    run = _run()
    assert lean.release_unused_vae(run.models, run.group, True) and run.models.vae.weight.is_meta
    for unused, run in ((False, _run()), (True, _run(latents=False))):
        assert not lean.release_unused_vae(run.models, run.group, unused) and not run.models.vae.weight.is_meta
