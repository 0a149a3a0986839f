"""Noise schedules: DDPM ᾱ / SNR / zero terminal SNR, flow σ with shift, and the map u -> t or σ -> bin.

Spec §0 (../shared/spec/losses-and-timesteps.md). One convention: the noise fraction u ∈ [0, 1) increases
with noise, and every family maps it to its own noise level:

* DDPM (SD1.x, SD2, SDXL): t = t_min + floor(u·(t_max − t_min)), clamped to [t_min, t_max − 1]; bin = t.
* flow (SD3): σ = clamp((t_min + S_s(u)·(t_max − t_min))/T, 1/T, 1), S_s(x) = s·x/(1 + (s − 1)·x);
  model timestep 1000·σ; bin = min(floor(σ·T), T − 1).

Tables are fp64 and built once; lookups are vectorised over the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000  # T, for every family here

# Stable Diffusion's scheduler (SD1.x, SD2, SDXL): scaled_linear betas from 0.00085 to 0.012.
SD_BETA_START = 0.00085
SD_BETA_END = 0.012


def betas_for(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> Tensor:
    """β_t as diffusers' DDPMScheduler builds them (fp32, like diffusers, then fp64).

    linear: linspace(β_start, β_end, T); scaled_linear: linspace(√β_start, √β_end, T)²."""
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:
        raise ValueError(f"unsupported beta_schedule '{beta_schedule}' (linear, scaled_linear)")
    return betas.double()


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """ᾱ_t = Π_{s ≤ t} (1 − β_s)."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def sd_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """ᾱ of the Stable Diffusion schedule (scaled_linear 0.00085..0.012), for use without a model."""
    return alphas_cumprod_from_betas(betas_for("scaled_linear", SD_BETA_START, SD_BETA_END, num_train_timesteps))


def alphas_cumprod_from_config(config: dict) -> Tensor:
    """ᾱ from a diffusers scheduler config (keys beta_schedule, beta_start, beta_end, num_train_timesteps)."""
    return alphas_cumprod_from_betas(betas_for(
        config.get("beta_schedule", "scaled_linear"), config.get("beta_start", SD_BETA_START),
        config.get("beta_end", SD_BETA_END), config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)))


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1; diffusers ``rescale_zero_terminal_snr``): shift √ᾱ so its last value is 0 and scale it so its
    first value is unchanged: √ᾱ' = (√ᾱ − √ᾱ_T)·√ᾱ_0/(√ᾱ_0 − √ᾱ_T). ᾱ'_T = 0, i.e. SNR_T = 0."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def snr_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """SNR_t = ᾱ_t/(1 − ᾱ_t) (0 where ᾱ_t = 0)."""
    alphas_cumprod = alphas_cumprod.double()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def shift(x: Tensor, s: float) -> Tensor:
    """S_s(x) = s·x/(1 + (s − 1)·x): the SD3 / Flux resolution shift (s > 1 moves mass to high noise).
    S_s is increasing on [0, 1] with S_s(0) = 0, S_s(1) = 1, and its inverse is S_{1/s}."""
    return s * x / (1.0 + (s - 1.0) * x)


def flow_snr(sigma: Tensor) -> Tensor:
    """Flow matching x_σ = (1 − σ)·x0 + σ·ε: SNR(σ) = ((1 − σ)/σ)²."""
    return ((1.0 - sigma) / sigma) ** 2


@dataclass(frozen=True)
class TimestepRange:
    """``--min_timestep`` / ``--max_timestep``: t_min (0) and t_max (1000), t_min < t_max."""

    t_min: int = 0
    t_max: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self):
        if not 0 <= self.t_min < self.t_max <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"timestep range needs 0 <= t_min < t_max <= {NUM_TRAIN_TIMESTEPS}, "
                             f"got {self.t_min}, {self.t_max}")

    @property
    def width(self) -> int:
        return self.t_max - self.t_min


class DDPMSchedule:
    """A DDPM schedule given by ᾱ (after any zero-terminal-SNR rescale): integer t, SNR, bins."""

    kind = "ddpm"

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.num_train_timesteps = self.alphas_cumprod.numel()
        self.snr_table = snr_from_alphas_cumprod(self.alphas_cumprod)

    def timesteps_from_u(self, u: Tensor, rng: TimestepRange) -> Tensor:
        """t = t_min + floor(u·(t_max − t_min)), clamped to [t_min, t_max − 1] (long)."""
        t = rng.t_min + torch.floor(u.double() * rng.width)
        return t.clamp(rng.t_min, rng.t_max - 1).long()

    def alpha_bar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod.to(t.device)[t.long()]

    def snr(self, t: Tensor) -> Tensor:
        return self.snr_table.to(t.device)[t.long()]

    def bins(self, t: Tensor) -> Tensor:
        """DDPM bin = t."""
        return t.long()

    def bin_edges_u(self, rng: TimestepRange) -> Tensor:
        """u-edges [T + 1] such that u ∈ [e_b, e_{b+1}) maps to bin b (fp64; empty bins have e_b = e_{b+1}).

        t = t_min + floor(u·W) = b ⇔ u ∈ [(b − t_min)/W, (b + 1 − t_min)/W), clipped to [0, 1]."""
        b = torch.arange(self.num_train_timesteps + 1, dtype=torch.float64)
        return ((b - rng.t_min) / rng.width).clamp(0.0, 1.0)


class FlowSchedule:
    """Rectified-flow noise levels σ with a shift s (SD3): σ, SNR, bins."""

    kind = "flow"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps

    def sigmas_from_u(self, u: Tensor, rng: TimestepRange) -> Tensor:
        """σ = clamp((t_min + S_s(u)·(t_max − t_min))/T, 1/T, 1) (fp64)."""
        T = self.num_train_timesteps
        sigma = (rng.t_min + shift(u.double(), self.shift) * rng.width) / T
        return sigma.clamp(1.0 / T, 1.0)

    def timesteps(self, sigma: Tensor) -> Tensor:
        """The model's timestep input: 1000·σ (float)."""
        return sigma * self.num_train_timesteps

    def snr(self, sigma: Tensor) -> Tensor:
        return flow_snr(sigma)

    def bins(self, sigma: Tensor) -> Tensor:
        """Flow bin = min(floor(σ·T), T − 1)."""
        T = self.num_train_timesteps
        return torch.floor(sigma.double() * T).clamp(max=T - 1).long()

    def bin_edges_u(self, rng: TimestepRange) -> Tensor:
        """u-edges [T + 1] such that u ∈ [e_b, e_{b+1}) maps to bin b (fp64).

        In σ·T the bins are [b, b + 1), except that the clamp σ ≥ 1/T folds everything below 1 into bin 1 and
        σ = 1 falls in bin T − 1. σ·T = t_min + S(u)·W, so u = S_{1/s}((σ·T − t_min)/W)."""
        T = self.num_train_timesteps
        level = torch.arange(T + 1, dtype=torch.float64)
        level[:2] = float("-inf")  # bin 0 is empty; bin 1 starts at u = 0
        level[T] = float("inf")    # bin T − 1 ends at u = 1
        return shift(((level - rng.t_min) / rng.width).clamp(0.0, 1.0), 1.0 / self.shift).clamp(0.0, 1.0)
