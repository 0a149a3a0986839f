"""Timestep samplers: each is the inverse CDF of a uniform U, returning the noise fraction u ∈ [0, 1).

Spec §3 (../shared/spec/losses-and-timesteps.md). Because a sampler only transforms the uniforms it is handed
(k-diffusion's design), distribution, stratification (§3) and cluster slices (§6) are independent: strata and
slices act on U, the sampler maps them. Every sampler is increasing in U, so the slice [k/K, (k+1)/K) of U is the
k-th quantile slice of u (cluster k is the k-th noise band for every sampler).

Each sampler also gives its CDF and density p(u): the loss map mixes with the base sampler's bin
probabilities, and tools/show_timesteps.py draws the density. All math is fp64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from library.schedules import shift

_SQRT2 = math.sqrt(2.0)
_TINY = 1e-300  # keeps Φ⁻¹(0) and log(0) finite where a limit is meant


class Sampler(Protocol):
    def icdf(self, U: Tensor) -> Tensor: ...     # U ∈ [0, 1) -> u ∈ [0, 1], increasing
    def cdf(self, u: Tensor) -> Tensor: ...      # P(u' ≤ u)
    def density(self, u: Tensor) -> Tensor: ...  # p(u)


def normal_icdf(U: Tensor) -> Tensor:
    """Φ⁻¹(U) = √2·erfinv(2U − 1); ±inf at U = 0, 1."""
    return _SQRT2 * torch.special.erfinv(2.0 * U.double() - 1.0)


def normal_cdf(z: Tensor) -> Tensor:
    return torch.special.ndtr(z)


def logit(u: Tensor) -> Tensor:
    u = u.double()
    return torch.log(u.clamp_min(_TINY)) - torch.log1p(-u)


@dataclass(frozen=True)
class Uniform:
    """u = U."""

    def icdf(self, U: Tensor) -> Tensor:
        return U.double()

    def cdf(self, u: Tensor) -> Tensor:
        return u.double().clamp(0.0, 1.0)

    def density(self, u: Tensor) -> Tensor:
        return torch.ones_like(u, dtype=torch.float64)


@dataclass(frozen=True)
class LogitNormal:
    """u = sigmoid(m + s·z), z = Φ⁻¹(U) (SD3 paper §3.1, Esser et al. 2024). ``sigmoid`` is (0, scale).

    CDF Φ((logit u − m)/s); density φ((logit u − m)/s)/(s·u·(1 − u))."""

    mean: float = 0.0
    std: float = 1.0

    def icdf(self, U: Tensor) -> Tensor:
        return torch.sigmoid(self.mean + self.std * normal_icdf(U))

    def cdf(self, u: Tensor) -> Tensor:
        return normal_cdf((logit(u) - self.mean) / self.std)

    def density(self, u: Tensor) -> Tensor:
        u = u.double()
        z = (logit(u) - self.mean) / self.std
        pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        return torch.nan_to_num(pdf / (self.std * u * (1.0 - u)), nan=0.0, posinf=0.0)


MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))  # the mode sampler is monotone exactly on this range


@dataclass(frozen=True)
class Mode:
    """Mode sampling with heavy tails (SD3 paper eq. 20): f(x) = 1 − x − s·(cos²(πx/2) − 1 + x), x = 1 − U,
    which is u = U + s·(U − sin²(πU/2)). diffusers and KS draw f(U) directly; we use x = 1 − U (same
    distribution) so u increases with U. Monotone for s ∈ [−1, 2/(π − 2)]: g'(U) = 1 + s·(1 − (π/2)·sin πU).

    No closed-form CDF: it is g⁻¹(u), found by bisection (g is increasing)."""

    scale: float = 1.29

    def icdf(self, U: Tensor) -> Tensor:
        U = U.double()
        return (U + self.scale * (U - torch.sin(math.pi * U / 2) ** 2)).clamp(0.0, 1.0)

    def cdf(self, u: Tensor) -> Tensor:
        u = u.double().clamp(0.0, 1.0)
        lo, hi = torch.zeros_like(u), torch.ones_like(u)
        for _ in range(60):  # 2⁻⁶⁰: below fp64 resolution
            mid = 0.5 * (lo + hi)
            below = self.icdf(mid) < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def density(self, u: Tensor) -> Tensor:
        U = self.cdf(u)
        slope = 1.0 + self.scale * (1.0 - 0.5 * math.pi * torch.sin(math.pi * U))
        return 1.0 / slope.clamp_min(1e-12)


@dataclass(frozen=True)
class CosMap:
    """u = 1 − 1/(tan(πU/2) + 1) (SD3 paper eq. 21, as a sampler). CDF (2/π)·atan(u/(1 − u)), density
    2/(π·(1 − 2u + 2u²))."""

    def icdf(self, U: Tensor) -> Tensor:
        return 1.0 - 1.0 / (torch.tan(0.5 * math.pi * U.double()) + 1.0)

    def cdf(self, u: Tensor) -> Tensor:
        u = u.double().clamp(0.0, 1.0)
        return (2.0 / math.pi) * torch.atan2(u, 1.0 - u)

    def density(self, u: Tensor) -> Tensor:
        u = u.double()
        return 2.0 / (math.pi * (1.0 - 2.0 * u + 2.0 * u**2))


BETA_TABLE_SIZE = 4096


@dataclass(frozen=True)
class Beta:
    """u ~ Beta(α, β) by inverse CDF. torch has no incomplete-beta inverse, so the quantiles at 4096 equally
    spaced U are computed once with ``scipy.special.betaincinv`` and interpolated linearly. The interpolated
    u stays between two exact quantiles, so the CDF error is below 1/4095 whatever α and β are (a torch
    bisection would need the incomplete beta function, which torch lacks too). The CDF interpolates the
    same table the other way; the density is analytic."""

    alpha: float
    beta: float
    quantiles: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        from scipy.special import betaincinv  # scipy is needed only by this sampler

        grid = torch.linspace(0.0, 1.0, BETA_TABLE_SIZE, dtype=torch.float64)
        table = torch.from_numpy(betaincinv(self.alpha, self.beta, grid.numpy())).double()
        table = torch.cummax(table.clamp(0.0, 1.0), 0).values  # exactly monotone despite rounding
        object.__setattr__(self, "quantiles", table)

    def icdf(self, U: Tensor) -> Tensor:
        table = self.quantiles.to(U.device)
        position = U.double().clamp(0.0, 1.0) * (BETA_TABLE_SIZE - 1)
        index = position.floor().long().clamp(max=BETA_TABLE_SIZE - 2)
        frac = position - index
        return table[index] + frac * (table[index + 1] - table[index])

    def cdf(self, u: Tensor) -> Tensor:
        table = self.quantiles.to(u.device)
        u = u.double().clamp(0.0, 1.0)
        upper = torch.searchsorted(table, u, right=True).clamp(1, BETA_TABLE_SIZE - 1)
        lo, hi = table[upper - 1], table[upper]
        frac = torch.where(hi > lo, (u - lo) / (hi - lo).clamp_min(_TINY), torch.ones_like(u))
        return ((upper - 1 + frac.clamp(0.0, 1.0)) / (BETA_TABLE_SIZE - 1)).clamp(0.0, 1.0)

    def density(self, u: Tensor) -> Tensor:
        u = u.double()
        log_norm = math.lgamma(self.alpha) + math.lgamma(self.beta) - math.lgamma(self.alpha + self.beta)
        log_p = ((self.alpha - 1) * torch.log(u.clamp_min(_TINY))
                 + (self.beta - 1) * torch.log1p(-u.clamp(max=1 - 1e-16)))
        return torch.exp(log_p - log_norm)


@dataclass(frozen=True)
class Shifted:
    """A base sampler followed by the shift S_s (KS Flux ``shift`` / ``flux_shift``): u = S_s(base(U)).
    CDF: base.cdf(S_{1/s}(u)); density: base.density(S_{1/s}(u))·dS_{1/s}/du, dS_a(x)/dx = a/(1 + (a − 1)x)²."""

    base: Sampler
    shift: float

    def icdf(self, U: Tensor) -> Tensor:
        return shift(self.base.icdf(U), self.shift)

    def cdf(self, u: Tensor) -> Tensor:
        return self.base.cdf(shift(u.double(), 1.0 / self.shift))

    def density(self, u: Tensor) -> Tensor:
        a = 1.0 / self.shift
        u = u.double()
        return self.base.density(shift(u, a)) * a / (1.0 + (a - 1.0) * u) ** 2


# ------------------------------------------------------------------------------------------------------------
# Sampler parameters that depend on the step or the image
# ------------------------------------------------------------------------------------------------------------
def dynamic_logit_mean(step: int, total_steps: int, start: float, end: float, fraction: float) -> float:
    """``logit_normal_dynamic``: the mean moves linearly from ``start`` to ``end`` over the first
    ``fraction`` of training, then stays at ``end``."""
    ramp_steps = max(fraction * total_steps, 1.0)
    return start + (end - start) * min(max(step / ramp_steps, 0.0), 1.0)


def flux_shift_mu(image_tokens: int) -> float:
    """μ linear in the latent token count through (256, 0.5) and (4096, 1.15) (KS/Flux ``get_lin_function``);
    the shift is e^μ."""
    return 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)


def image_tokens(latent_height: int, latent_width: int) -> int:
    """Flux counts 2×2 latent patches: (h // 2)·(w // 2)."""
    return (latent_height // 2) * (latent_width // 2)


@dataclass(frozen=True)
class SamplerParams:
    """The flags the samplers read (KS names, spec defaults)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    beta_alpha: float | None = None
    beta_beta: float | None = None
    logit_mean_end: float = 0.65
    dynamic_fraction: float = 0.8


def _flux_shift(p: SamplerParams, step: int, total_steps: int, tokens: int | None) -> Sampler:
    if tokens is None:
        raise ValueError("flux_shift needs the latent size: pass latent_shape to LossEngine.sample_levels")
    return Shifted(LogitNormal(0.0, p.sigmoid_scale), math.exp(flux_shift_mu(tokens)))


_BUILDERS: dict[str, Callable[[SamplerParams, int, int, int | None], Sampler]] = {
    "uniform": lambda p, step, total, tokens: Uniform(),
    "logit_normal": lambda p, step, total, tokens: LogitNormal(p.logit_mean, p.logit_std),
    "sigmoid": lambda p, step, total, tokens: LogitNormal(0.0, p.sigmoid_scale),
    "mode": lambda p, step, total, tokens: Mode(p.mode_scale),
    "cosmap": lambda p, step, total, tokens: CosMap(),
    "beta": lambda p, step, total, tokens: Beta(p.beta_alpha, p.beta_beta),
    "shift": lambda p, step, total, tokens: Shifted(LogitNormal(0.0, p.sigmoid_scale), p.discrete_flow_shift),
    "flux_shift": _flux_shift,
    "logit_normal_dynamic": lambda p, step, total, tokens: LogitNormal(
        dynamic_logit_mean(step, total, p.logit_mean, p.logit_mean_end, p.dynamic_fraction), p.logit_std),
}
SAMPLER_NAMES = tuple(_BUILDERS)
STEP_DEPENDENT = frozenset({"logit_normal_dynamic"})
IMAGE_DEPENDENT = frozenset({"flux_shift"})


def build_sampler(name: str, params: SamplerParams, step: int = 0, total_steps: int = 1,
                  tokens: int | None = None) -> Sampler:
    """The sampler called ``name`` at this step (and image token count, for flux_shift)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown timestep sampler '{name}'; known: {', '.join(SAMPLER_NAMES)}") from None
    return builder(params, step, total_steps, tokens)


# ------------------------------------------------------------------------------------------------------------
# Transforms of U: strata and cluster slices
# ------------------------------------------------------------------------------------------------------------
def stratified(U: Tensor, strata: Tensor, num_strata: int) -> Tensor:
    """U_i' = (π_i + U_i)/N: sample i lies in stratum π_i of N equal strata of [0, 1) (spec §3).

    ``strata`` holds this batch's entries of one permutation of 0..N−1 shared by the whole global batch (all
    ranks, all micro-batches of an optimizer step), so the global batch covers every stratum once."""
    return (strata.to(U) + U) / num_strata


def cluster_slice(U: Tensor, cluster: int, num_clusters: int) -> Tensor:
    """U' = (k + U)/K ∈ [k/K, (k + 1)/K): after the sampler's inverse CDF, the k-th quantile slice of u
    (spec §6). Averaged over uniformly drawn k, U' is uniform again, so the marginal of u is unchanged."""
    return (cluster + U) / num_clusters


def bin_probabilities(sampler: Sampler, edges_u: Tensor) -> Tensor:
    """P(bin = b) = CDF(e_{b+1}) − CDF(e_b) for u-edges e [T + 1] of a schedule (fp64, sums to 1)."""
    cdf = sampler.cdf(edges_u)
    probs = (cdf[1:] - cdf[:-1]).clamp_min(0.0)
    return probs / probs.sum()
