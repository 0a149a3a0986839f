"""Noisy model inputs and training targets per prediction type, and the KS noise extras.

Spec §0 (../shared/spec/losses-and-timesteps.md):
* DDPM (Ho et al. 2020): x_t = √ᾱ·x0 + √(1 − ᾱ)·ε; target ε, or v = √ᾱ·ε − √(1 − ᾱ)·x0 (Salimans & Ho 2022).
* flow (rectified flow, SD3): x_σ = (1 − σ)·x0 + σ·ε; target the velocity ε − x0; with ``--precondition_outputs``
  (prediction type "flow_x0") the model output F becomes x̂0 = x_σ − σ·F and the target is x0.

Noise extras draw from the generator they are handed (the per-rank counter-based one, library/rng.py), never
from the global RNG.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_nn
from torch import Tensor

from library.losses import per_sample_view


def ddpm_noisy(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε, ᾱ_t per sample [B]."""
    ab = per_sample_view(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def v_target(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 (Salimans & Ho 2022, eq. in §4)."""
    ab = per_sample_view(alpha_bar, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def flow_noisy(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε."""
    s = per_sample_view(sigma, x0)
    return (1 - s) * x0 + s * eps


def flow_velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """v = dx_σ/dσ = ε − x0."""
    return eps - x0


def flow_x0_from_prediction(pred: Tensor, noisy: Tensor, sigma: Tensor) -> Tensor:
    """x̂0 = x_σ − σ·F (KS SD3 ``--precondition_outputs``)."""
    return noisy - per_sample_view(sigma, pred) * pred


def prediction_to_loss_space(pred: Tensor, noisy: Tensor | None, levels, prediction_type: str = "flow_x0") -> Tensor:
    """The model output in the space its target lives in: x̂0 = x_σ − σ·F for "flow_x0", unchanged otherwise.
    ``levels`` is a NoiseLevels (its ``sigma`` is used)."""
    if prediction_type != "flow_x0":
        return pred
    if noisy is None or levels.sigma is None:
        raise ValueError("flow_x0 (--precondition_outputs) needs the noisy input and σ to form x̂0")
    return flow_x0_from_prediction(pred, noisy.to(pred.dtype), levels.sigma.to(pred))


# ------------------------------------------------------------------------------------------------------------
# Noise extras (KS flags)
# ------------------------------------------------------------------------------------------------------------
def _randn(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(like)


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32).to(like)


def offset_noise(latents: Tensor, generator: torch.Generator, noise_offset: float,
                 adaptive_noise_scale: float | None = None, random_strength: bool = False) -> Tensor:
    """The offset to add to ε (Guttenberg 2023, "Diffusion with Offset Noise"; KS ``apply_noise_offset``):
    o·n with n ~ N(0, 1) of shape [B, C, 1, 1]; o = noise_offset, times U(0, 1) per sample with
    ``random_strength``, plus adaptive_noise_scale·|mean_HW(latents)| (clamped ≥ 0) when given.
    KS draws the random strength once per batch; we draw it per sample, so a sample's noise does not depend on
    what else is in its batch."""
    B, C = latents.shape[:2]
    per_channel = (B, C) + (1,) * (latents.dim() - 2)
    offset = torch.full((B,) + (1,) * (latents.dim() - 1), float(noise_offset), device=latents.device)
    if random_strength:
        offset = offset * _rand(offset.shape, generator, offset)
    if adaptive_noise_scale is not None:
        latent_mean = latents.float().mean(dim=tuple(range(2, latents.dim())), keepdim=True).abs()
        offset = (offset + adaptive_noise_scale * latent_mean).clamp_min(0.0)
    return (offset * _randn(per_channel, generator, offset)).to(latents.dtype)


def multires_noise(noise: Tensor, generator: torch.Generator, iterations: int, discount: float) -> Tensor:
    """Pyramid noise (Whitaker 2023, "Multi-Resolution Noise"; KS ``pyramid_noise_like``): for i = 0..n−1 add
    upsample(N(0, 1) at size (H, W)/r^i)·discount^i with r ~ U(2, 4), stopping once a side reaches 1; then rescale
    to unit std. KS draws r from Python's global RNG and rescales by the whole batch's std; we draw r from the
    step's generator and rescale per sample."""
    B, C, H, W = noise.shape
    ratios = (2 + 2 * torch.rand(iterations, generator=generator, device=generator.device)).tolist()
    out = noise.float()
    for i, r in enumerate(ratios):
        h, w = max(1, int(H / r**i)), max(1, int(W / r**i))
        coarse = _randn((B, C, h, w), generator, out)
        out = out + F_nn.interpolate(coarse, size=(H, W), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    std = out.std(dim=(1, 2, 3), keepdim=True)
    return (out / std).to(noise.dtype)


def input_perturbation(noise: Tensor, generator: torch.Generator, gamma: float,
                       random_strength: bool = False) -> Tensor:
    """ε + γ·ξ, ξ ~ N(0, 1): the noise used to build the noisy input under ``--ip_noise_gamma`` (Ning et al.
    2023, "Input Perturbation Reduces Exposure Bias"); the target keeps the unperturbed ε. With
    ``random_strength`` γ is scaled by U(0, 1) per sample (KS: once per batch)."""
    B = noise.shape[0]
    strength = torch.full((B,) + (1,) * (noise.dim() - 1), float(gamma), device=noise.device)
    if random_strength:
        strength = strength * _rand(strength.shape, generator, strength)
    xi = _randn(tuple(noise.shape), generator, noise)
    return noise + strength.to(noise.dtype) * xi
