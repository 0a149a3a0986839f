"""Per-sample timestep weights (spec §4, ../shared/spec/losses-and-timesteps.md).

"x0-space" defines the SNR weights for every prediction type: the weighted objective is w0(SNR)·‖x̂0 − x0‖².
A model's own squared error converts to x0-space by the factor 1/SNR (ε), 1/(SNR + 1) (v), σ² (flow velocity)
or 1 (x0, preconditioned flow). All weights are functions of [B] tensors in their dtype (fp32 in training,
fp64 in tests and tools; no fp64 on the device, which some backends lack), finite for every SNR ≥ 0
(zero terminal SNR included) and every σ ∈ [1/T, 1].

Prediction types: "epsilon", "v_prediction" (DDPM), "flow" (velocity), "flow_x0" (``--precondition_outputs``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow", "flow_x0")
SNR_FLOOR, SNR_CEIL = 1e-8, 1000.0  # SNR' = clamp(SNR, 1e-8, 1000) of debiased / scale_v / v_pred_like
SNR_WEIGHTINGS = ("snr", "max_snr")
# The documented bound on the product of the timestep weights (docs/losses-and-timesteps.md, "Bound"). Without it
# zero terminal SNR (SNR = 0 at t = 999) gives 1e4 (debiased ε), 1e8·λ (v_pred_like) and 1e12 (both), and
# sigma_sqrt gives 1e6 at σ = 1/T. 1000 leaves every weight of SD's own schedule without zero terminal SNR alone
# (debiased ε ≤ 14.6, v_pred_like ≤ 1 + 214λ, max-SNR-1 ε ≤ 213) and caps only those extremes.
MAX_TIMESTEP_WEIGHT = 1000.0


def clamped_snr(snr: Tensor) -> Tensor:
    """SNR' = clamp(SNR, 1e-8, 1000) (KS clamps at 1000; the floor keeps SNR = 0 finite)."""
    return snr.clamp(SNR_FLOOR, SNR_CEIL)


def _require_sigma(sigma: Tensor | None, what: str) -> Tensor:
    if sigma is None:
        raise ValueError(f"{what} for a flow prediction type needs sigma")
    return sigma


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str, sigma: Tensor | None = None) -> Tensor:
    """Min-SNR-γ (Hang et al. 2023): w0 = min(SNR, γ) in x0-space, so
    ε: min(SNR, γ)/SNR = min(1, γ/SNR) (= 1 at SNR = 0); v: min(SNR, γ)/(SNR + 1);
    flow velocity: min(SNR, γ)·σ²; x0: min(SNR, γ)."""
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # γ/0 = inf -> 1: finite at zero terminal SNR
    capped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return capped / (snr + 1)
    if prediction_type == "flow":
        return capped * _require_sigma(sigma, "min_snr_gamma") ** 2
    if prediction_type == "flow_x0":
        return capped
    raise ValueError(f"unknown prediction_type '{prediction_type}'")


def debiased_weight(snr: Tensor, prediction_type: str, sigma: Tensor | None = None) -> Tensor:
    """Debiased estimation (Yu et al. 2024; KS ``apply_debiased_estimation``), SNR' = clamp(SNR, 1e-8, 1000):
    ε: 1/√SNR'; v: 1/(SNR' + 1) (KS form, kept for compatibility); flow velocity: σ·(1 − σ);
    x0: (1 − σ)/σ, the velocity weight moved to x0-space (÷σ²), = √SNR."""
    if prediction_type == "epsilon":
        return clamped_snr(snr).rsqrt()
    if prediction_type == "v_prediction":
        return 1.0 / (clamped_snr(snr) + 1)
    sigma = _require_sigma(sigma, "debiased_estimation_loss")
    if prediction_type == "flow":
        return sigma * (1 - sigma)
    if prediction_type == "flow_x0":
        return (1 - sigma) / sigma
    raise ValueError(f"unknown prediction_type '{prediction_type}'")


def snr_weight(snr: Tensor, mode: str, gamma: float, prediction_type: str, sigma: Tensor | None = None) -> Tensor:
    """``--snr_weighting`` (the baselines of the Min-SNR paper, Hang et al. 2023, Table 1), in x0-space:
    snr: w0 = SNR (= plain ε-prediction MSE); max_snr: w0 = max(SNR, γ) (``--max_snr_gamma``, 1 = Salimans &
    Ho 2022's "truncated SNR"). Converted like min-SNR: ε ÷SNR, v ÷(SNR + 1), flow velocity ×σ², x0 ×1.
    ε: snr → 1, max_snr → max(1, γ/SNR') (SNR' = clamp(SNR, 1e-8, 1000); bounded by MAX_TIMESTEP_WEIGHT in
    timestep_weights)."""
    if mode not in SNR_WEIGHTINGS:
        raise ValueError(f"unknown snr weighting '{mode}'; known: {', '.join(SNR_WEIGHTINGS)}")
    w0 = snr if mode == "snr" else snr.clamp(min=gamma)
    if prediction_type == "epsilon":
        # SNR' keeps it finite at SNR = 0 (γ·1e8), so a later factor of 0 cannot turn inf·0 into NaN
        return torch.ones_like(snr) if mode == "snr" else (gamma / clamped_snr(snr)).clamp(min=1.0)
    if prediction_type == "v_prediction":
        return w0 / (snr + 1)
    if prediction_type == "flow":
        sigma = _require_sigma(sigma, "snr_weighting")
        return (1 - sigma) ** 2 if mode == "snr" else w0 * sigma**2  # SNR·σ² = (1 − σ)², finite at σ = 1
    if prediction_type == "flow_x0":
        return w0
    raise ValueError(f"unknown prediction_type '{prediction_type}'")


def scale_v_like_noise_weight(snr: Tensor) -> Tensor:
    """``--scale_v_pred_loss_like_noise_pred`` (v only, KS): SNR'/(SNR' + 1), which turns the v loss into the
    ε loss's scale."""
    snr = clamped_snr(snr)
    return snr / (snr + 1)


def v_pred_like_weight(snr: Tensor, lam: float) -> Tensor:
    """``--v_pred_like_loss λ`` (ε only, KS ``add_v_prediction_like_loss``): 1 + λ·(SNR' + 1)/SNR', i.e. the
    ε loss plus λ times the same loss on the v scale."""
    snr = clamped_snr(snr)
    return 1 + lam * (snr + 1) / snr


def sd3_scheme_weight(scheme: str, sigma: Tensor) -> Tensor:
    """SD3 loss weights (Esser et al. 2024; diffusers ``compute_loss_weighting_for_sd3``): sigma_sqrt σ⁻²
    (finite: σ ≥ 1/T); cosmap 2/(π(1 − 2σ + 2σ²)); anything else 1."""
    if scheme == "sigma_sqrt":
        return sigma**-2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


def loss_curve_offset_weight(noise_fraction: Tensor, step: int, total_steps: int, scale: float,
                             schedule: float = 0.0) -> Tensor:
    """``--loss_curve_offset SCALE`` / ``--loss_curve_offset_schedule S``: c = SCALE + S·step/total,
    w = 1 − 2c·(sigmoid(12·t/T − 6) − 0.5) with t/T the noise fraction (DDPM t/1000, flow σ). A positive c
    raises the loss at low noise (w → 1 + 0.995c) and lowers it at high noise (w → 1 − 0.995c), as the authors
    describe (their code had the opposite sign)."""
    c = scale + schedule * step / max(total_steps, 1)
    return 1 - 2 * c * (torch.sigmoid(12 * noise_fraction - 6) - 0.5)


def trained_mean(values: Tensor, trained_bins: Tensor | None) -> Tensor:
    """mean(M) over the bins training can reach (``trained_bins`` a bool mask [T]; None: all bins). Bins outside
    ``--min_timestep`` / ``--max_timestep`` are never updated and stay at 1.0, so counting them would pull
    every ratio M[b]/mean towards the initial value instead of 1."""
    return values[trained_bins].mean() if trained_bins is not None else values.mean()


def loss_map_offset_weight(map_values: Tensor, bins: Tensor, step: int, total_steps: int,
                           trained_bins: Tensor | None = None) -> Tensor:
    """``--loss_map_offset``: w_i = 1 + (M[b_i]/mean(M) − 1)·a, a = clamp(1 − step/total, 0, 1) falling from 1
    at step 0 to 0 at the end; per sample (the original broadcast it into one batch scale). The mean is over the
    trained bins only (``trained_bins``), so a map that is flat there gives exactly 1 for any timestep range."""
    fade = min(max(1.0 - step / max(total_steps, 1), 0.0), 1.0)
    values = map_values.detach()
    relative = values.to(bins.device)[bins.long()] / trained_mean(values, trained_bins).item()
    return 1 + (relative - 1) * fade


@dataclass(frozen=True)
class WeightOptions:
    """The §4 weight flags, resolved (None / False / 0 = off)."""

    prediction_type: str
    weighting_scheme: str = "uniform"
    min_snr_gamma: float | None = None
    snr_weighting: str | None = None
    max_snr_gamma: float = 1.0
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    loss_curve_offset: float | None = None
    loss_curve_offset_schedule: float = 0.0
    loss_map_offset: bool = False

    @property
    def curve_offset_enabled(self) -> bool:
        return bool(self.loss_curve_offset) or bool(self.loss_curve_offset_schedule)


def timestep_weights(opts: WeightOptions, snr: Tensor, sigma: Tensor | None, noise_fraction: Tensor,
                     bins: Tensor, step: int, total_steps: int, map_values: Tensor | None = None,
                     trained_bins: Tensor | None = None) -> Tensor:
    """The product of every enabled timestep weight, multiplied in the spec's order (§0): SD3 scheme · min-SNR ·
    SNR weighting · scale_v · v_pred_like · debiased · loss curve offset · loss-map offset, then bounded by
    MAX_TIMESTEP_WEIGHT. Dtype of ``snr`` [B]; ones when none is on. ``noise_fraction`` is t/T (DDPM) or σ
    (flow); ``map_values`` the loss map (needed by loss_map_offset), ``trained_bins`` its trained range."""
    p = opts.prediction_type
    weight = torch.ones_like(snr)
    if opts.weighting_scheme in ("sigma_sqrt", "cosmap"):
        weight = weight * sd3_scheme_weight(opts.weighting_scheme, _require_sigma(sigma, "weighting_scheme"))
    if opts.min_snr_gamma:
        weight = weight * min_snr_weight(snr, opts.min_snr_gamma, p, sigma)
    if opts.snr_weighting:
        weight = weight * snr_weight(snr, opts.snr_weighting, opts.max_snr_gamma, p, sigma)
    if opts.scale_v_pred_loss_like_noise_pred:
        weight = weight * scale_v_like_noise_weight(snr)
    if opts.v_pred_like_loss:
        weight = weight * v_pred_like_weight(snr, opts.v_pred_like_loss)
    if opts.debiased_estimation_loss:
        weight = weight * debiased_weight(snr, p, sigma)
    if opts.curve_offset_enabled:
        weight = weight * loss_curve_offset_weight(noise_fraction, step, total_steps, opts.loss_curve_offset or 0.0,
                                                   opts.loss_curve_offset_schedule)
    if opts.loss_map_offset:
        if map_values is None:
            raise ValueError("loss_map_offset needs the loss map's values")
        weight = weight * loss_map_offset_weight(map_values, bins, step, total_steps, trained_bins).to(weight)
    return weight.clamp(max=MAX_TIMESTEP_WEIGHT)
