"""Elementwise losses, Huber thresholds and the per-sample reduction.

Spec §1, §2, §5.4, §6 (../shared/spec/losses-and-timesteps.md). Everything is fp32 (callers pass fp32 tensors),
vectorised over the batch; per-sample quantities have shape [B] and broadcast over the non-batch dims.
Layout: [B, C, *spatial] (latents are [B, C, H, W]).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1", "combined", "ew", "clustered_mse")
THRESHOLD_LOSS_TYPES = ("huber", "smooth_l1")  # the loss types that use the Huber threshold c
HUBER_SCHEDULES = ("constant", "exponential", "snr")
COSINE_DIMS = ("spatial", "channel", "flat")
COMBINED_TERMS = ("mse", "l1", "cosine")
DEFAULT_COMBINED_WEIGHTS = {"mse": 0.4, "l1": 0.4, "cosine": 0.2}
CLUSTERED_MSE_CLUSTERS = 8  # value clusters per sample for clustered_mse (quantile bins of d²)
CLUSTERED_MSE_EDGE_SAMPLES = 4096  # values per sample the quantile edges are estimated from
EW_BLEND_FLAT_MAP = 0.0     # map position on a flat map: no bin is harder than another (ew: plain MSE)
CLUSTERED_MSE_MODES = ("quantile", "kmeans")
MASK_NORMALIZATIONS = ("area", "none")  # masked loss: Σ ℓ·m / Σ m (spec §0), or KS's mean(ℓ·m)
KMEANS_CLUSTER_RANGE = (4, 100)  # clusters per sample of --clustered_mse_mode kmeans, easiest .. hardest map bin
KMEANS_ITERATIONS = 8            # Lloyd iterations (1-D k-means from quantile starts settles in a few)


def per_sample_view(x: Tensor | float, like: Tensor) -> Tensor:
    """[B] (or a scalar) -> [B, 1, 1, ...] broadcastable against ``like``."""
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return x.reshape(-1, *([1] * (like.dim() - 1))) if x.dim() else x


# ------------------------------------------------------------------------------------------------------------
# §1 elementwise losses
# ------------------------------------------------------------------------------------------------------------
def pseudo_huber(d: Tensor, c: Tensor | float) -> Tensor:
    """huber = 2c·(√(d² + c²) − c), computed as 2c·|d|·|d|/(hypot(d, c) + c) (same value; the naive difference
    cancels to 0 in fp32 when |d| ≪ c, and hypot never squares |d|, so nothing overflows). ≈ d² near 0,
    ≈ 2c·|d| far out. KS/DF pseudo-Huber (Charbonnier). Oracles: c = 0.1, d = 1 → 0.1809975124;
    c = 1, d = 1 → 0.8284271247."""
    c = per_sample_view(c, d)
    a = d.abs()
    return 2 * c * a * (a / (torch.hypot(d, c) + c))


def smooth_l1(d: Tensor, c: Tensor | float) -> Tensor:
    """smooth_l1 = 2·(√(d² + c²) − c), computed as 2·|d|·|d|/(hypot(d, c) + c). KS naming (≈ d²/c near 0,
    ≈ 2|d| far out); NOT torch's SmoothL1Loss. Oracle: c = 0.1, d = 1 → 1.809975124."""
    c = per_sample_view(c, d)
    a = d.abs()
    return 2 * a * (a / (torch.hypot(d, c) + c))


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str, huber_c: Tensor | float | None = None) -> Tensor:
    """l2 d², l1 |d|, huber, smooth_l1 (threshold ``huber_c``, [B] or scalar), d = pred − target."""
    d = pred - target
    if loss_type == "l2":
        return d * d
    if loss_type == "l1":
        return d.abs()
    if loss_type in THRESHOLD_LOSS_TYPES:
        if huber_c is None:
            raise ValueError(f"loss_type '{loss_type}' needs huber_c")
        return pseudo_huber(d, huber_c) if loss_type == "huber" else smooth_l1(d, huber_c)
    raise ValueError(f"elementwise_loss: unknown loss_type '{loss_type}'; known: l2, l1, huber, smooth_l1")


# ------------------------------------------------------------------------------------------------------------
# §2 Huber thresholds
# ------------------------------------------------------------------------------------------------------------
def huber_c_constant(c0: float, k: float, timesteps: Tensor, snr: Tensor) -> Tensor:
    """c = k·c0."""
    return torch.full_like(snr, k * c0)


def huber_c_exponential(c0: float, k: float, timesteps: Tensor, snr: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """c(t) = k·c0^(t/T) (KS: exp(−α·t), α = −ln(c0)/T); flow t = 1000σ. c(0) = k, c(T/2) = k·√c0."""
    return k * c0 ** (timesteps.to(snr.dtype) / num_train_timesteps)


def huber_c_snr(c0: float, k: float, timesteps: Tensor, snr: Tensor) -> Tensor:
    """c = k·((1 − c0)/(1 + r)² + c0), r = 1/√SNR (KS "snr" schedule, with k applied: KS forgets it).

    Written as k·((1 − c0)·(√SNR/(1 + √SNR))² + c0), finite at SNR = 0 (r = ∞ → c = k·c0) and at large SNR.
    Flow: r = σ/(1 − σ), so c = k·((1 − c0)·(1 − σ)² + c0): small c (robust) at high noise, as for DDPM."""
    root = snr.clamp_min(0).sqrt()
    return k * ((1 - c0) * (root / (1 + root)) ** 2 + c0)


HUBER_THRESHOLDS: dict[str, Callable[..., Tensor]] = {
    "constant": huber_c_constant, "exponential": huber_c_exponential, "snr": huber_c_snr}


def huber_threshold(schedule: str, c0: float, k: float, timesteps: Tensor, snr: Tensor) -> Tensor:
    """Per-sample threshold c [B] (dtype of ``snr``) of ``--huber_schedule`` at the samples' timesteps (flow: 1000σ)
    and SNRs."""
    try:
        fn = HUBER_THRESHOLDS[schedule]
    except KeyError:
        raise ValueError(f"unknown huber_schedule '{schedule}'; known: {', '.join(HUBER_SCHEDULES)}") from None
    return fn(c0, k, timesteps, snr)


# ------------------------------------------------------------------------------------------------------------
# §1 / §6 combined loss
# ------------------------------------------------------------------------------------------------------------
def _cosine_reduce_dims(cosine_dim: str, ndim: int) -> tuple[int, ...]:
    """The dims a cosine is taken over: spatial = per (sample, channel) over H·W; channel = per (sample,
    position) over C; flat = per sample over everything."""
    if cosine_dim == "spatial":
        return tuple(range(2, ndim))
    if cosine_dim == "channel":
        return (1,)
    if cosine_dim == "flat":
        return tuple(range(1, ndim))
    raise ValueError(f"unknown cosine_dim '{cosine_dim}'; known: {', '.join(COSINE_DIMS)}")


def cosine_distance(pred: Tensor, target: Tensor, cosine_dim: str = "spatial", eps: float = 1e-8) -> Tensor:
    """1 − cos(pred, target) over the ``cosine_dim`` groups, kept as size-1 dims so it broadcasts: its mean over
    all elements is the mean over groups (groups have equal size). cos = ⟨p, t⟩/max(‖p‖·‖t‖, eps)."""
    dims = _cosine_reduce_dims(cosine_dim, pred.dim())
    dot = (pred * target).sum(dims, keepdim=True)
    norms = pred.square().sum(dims, keepdim=True).sqrt() * target.square().sum(dims, keepdim=True).sqrt()
    return 1 - dot / norms.clamp_min(eps)


def combined_loss(pred: Tensor, target: Tensor, weights: dict[str, float], cosine_dim: str = "spatial",
                  mask: Tensor | None = None) -> Tensor:
    """w_mse·d² + w_l1·|d| + w_cos·(1 − cos) elementwise (the cosine term broadcast over its group), spec §1/§6.

    With a mask, the cosine is taken between the masked prediction and target, so excluded pixels neither add
    to the dot product nor to the norms."""
    d = pred - target
    loss = weights.get("mse", 0.0) * d * d + weights.get("l1", 0.0) * d.abs()
    w_cos = weights.get("cosine", 0.0)
    if w_cos:
        if mask is not None:
            pred, target = pred * mask, target * mask
        loss = loss + w_cos * cosine_distance(pred, target, cosine_dim)
    return loss


# ------------------------------------------------------------------------------------------------------------
# §5.4 experimental losses
# ------------------------------------------------------------------------------------------------------------
def map_position(map_values: Tensor, bins: Tensor, trained_bins: Tensor | None = None) -> Tensor:
    """(M[b] − min M)/(max M − min M) ∈ [0, 1] of each sample's bin, min and max over the trained bins
    (``trained_bins``, a bool mask [T]; None: all). Bins outside --min_timestep/--max_timestep stay at 1.0 forever
    and would otherwise set the scale. A flat map carries no information: 0 (the original divided by zero)."""
    values = map_values.detach().float()
    if _is_flat(values, trained_bins):
        return torch.full(bins.shape, EW_BLEND_FLAT_MAP, dtype=torch.float32, device=bins.device)
    trained = values[trained_bins] if trained_bins is not None else values
    low, spread = float(trained.min()), float(trained.max() - trained.min())
    return ((values.to(bins.device)[bins.long()] - low) / spread).clamp(0.0, 1.0)


def _is_flat(map_values: Tensor, trained_bins: Tensor | None) -> bool:
    trained = map_values[trained_bins] if trained_bins is not None else map_values
    return float(trained.max() - trained.min()) <= 1e-12


def ew_blend(map_values: Tensor, bins: Tensor, step: int, total_steps: int,
             trained_bins: Tensor | None = None) -> Tensor:
    """The share β [B] of the ew loss in (1 − β)·d² + β·L, as published: importance ι_i = (max M − M[b_i])/
    (max M − min M) (easy noise levels, where the map is low, get the ew loss), blended half and half with the
    batch median, ι'_i = 0.5·ι_i + 0.5·median_j ι_j, and scheduled by s = max(0, 1 − 2·step/total) (ew fades
    out by mid-training, then plain MSE). median = the middle value, or the mean of the two middle values.
    Min and max over the trained bins; a flat map gives β = 0.

    Worked example (test_losses): M over the trained bins spans [1, 3], the batch's bins hold M = 1, 2, 3, 2.5:
    ι = 1, 0.5, 0, 0.25; median 0.375; ι' = 0.6875, 0.4375, 0.1875, 0.3125; step 25 of 100: s = 0.5,
    β = 0.34375, 0.21875, 0.09375, 0.15625."""
    if _is_flat(map_values, trained_bins):
        return torch.zeros(bins.shape, dtype=torch.float32, device=bins.device)
    importance = 1 - map_position(map_values, bins, trained_bins)
    blended = 0.5 * importance + 0.5 * torch.quantile(importance, 0.5)
    return blended * max(0.0, 1.0 - 2.0 * step / max(total_steps, 1))


def ew_loss(pred: Tensor, target: Tensor, alpha_bar: Tensor, blend: Tensor, boundary_shift: float = 0.0) -> Tensor:
    """Experimental "ew" loss (spec §5.4), elementwise [B, C, H, W]:

    a = |d|; μ = mean(a) + shift per sample; A = a·exp(a − μ); per (sample, channel) over H·W:
    F = mean(A)·ᾱ + std(A)·(1 − ᾱ), q = mean(d²); L = min(F, q) where F < mean_c(F), else 0.85·F + 0.15·q;
    result (1 − β)·d² + β·L with β the per-sample share of ``ew_blend`` (published importance and schedule).
    ᾱ is the signal fraction SNR/(1 + SNR) (DDPM: ᾱ_t; flow: (1 − σ)²/((1 − σ)² + σ²))."""
    d = pred - target
    d2 = d * d
    a = d.abs()
    spatial = tuple(range(2, d.dim()))
    mu = a.mean(tuple(range(1, d.dim())), keepdim=True) + boundary_shift
    A = a * torch.exp(a - mu)
    ab = per_sample_view(alpha_bar.to(d.dtype), d)
    F = A.mean(spatial, keepdim=True) * ab + A.std(spatial, correction=0, keepdim=True) * (1 - ab)
    q = d2.mean(spatial, keepdim=True)
    below = F < F.mean(1, keepdim=True)
    L = torch.where(below, torch.minimum(F, q), 0.85 * F + 0.15 * q)
    beta = per_sample_view(blend.to(d.dtype), d)
    return (1 - beta) * d2 + beta * L


def clustered_mse(pred: Tensor, target: Tensor, num_clusters: int = CLUSTERED_MSE_CLUSTERS) -> Tensor:
    """Experimental (spec §5.4): each element of d² replaced by the mean of its value cluster, the clusters
    being ``num_clusters`` quantile bins of d² per sample (in torch, no k-means; edges estimated from ≤ 4096
    values per sample).

    Per sample Σ_k n_k·mean_k = Σ d², and the cluster assignment is piecewise constant, so without a mask the
    per-sample mean equals MSE in value and in gradient (each element gets 1/N)."""
    d2 = (pred - target).square()
    flat = d2.reshape(d2.shape[0], -1)
    values = flat.detach()
    # Quantile edges from a strided subsample of ≤ 4096 values per sample: a full sort of 64k values per sample
    # costs ~10× more, and any partition keeps the MSE identity.
    stride = max(1, values.shape[1] // CLUSTERED_MSE_EDGE_SAMPLES)
    levels = torch.linspace(0, 1, num_clusters + 1, device=d2.device, dtype=values.dtype)[1:-1]
    edges = torch.quantile(values[:, ::stride], levels, dim=1)  # [K − 1, B]
    ids = torch.zeros_like(values, dtype=torch.long)
    for edge in edges:  # K − 1 comparisons, each vectorised over the whole batch
        ids += values > edge[:, None]
    return _cluster_means(flat, ids, num_clusters).reshape(d2.shape)


def _cluster_means(flat: Tensor, ids: Tensor, num_clusters: int) -> Tensor:
    """Each element of ``flat`` [B, N] replaced by the mean of its cluster (``ids`` [B, N] in [0, K))."""
    sums = torch.zeros(flat.shape[0], num_clusters, dtype=flat.dtype, device=flat.device).scatter_add(1, ids, flat)
    counts = torch.zeros_like(sums).scatter_add(1, ids, torch.ones_like(flat))
    means = sums / counts.clamp_min(1)
    return means.gather(1, ids)


def kmeans_cluster_counts(position: Tensor) -> Tensor:
    """``--clustered_mse_mode kmeans``: K_i = round(4 + 96·p_i) clusters, p_i ∈ [0, 1] the sample's place in the
    loss map (``map_position``): the hardest noise levels get 100 clusters (close to plain MSE detail), the
    easiest 4. Long [B]."""
    low, high = KMEANS_CLUSTER_RANGE
    return torch.round(low + (high - low) * position.clamp(0, 1)).long()


def kmeans_1d(values: Tensor, counts: Tensor, iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """Cluster ids [B, N] of 1-D k-means (Lloyd) per row of ``values`` [B, N] with ``counts`` [B] clusters each,
    all rows at once. Centroids start at the K quantile midpoints (k + 0.5)/K of the row; each iteration assigns
    every value to its nearest centroid (centroids kept sorted, so a searchsorted on their midpoints does it
    in O(N log K)) and moves each centroid to its members' mean (an empty cluster keeps its centroid). Rows with
    K < max K pad the centroids with +inf, which no value is nearest to."""
    B, N = values.shape
    k_max = int(counts.max())
    k = torch.arange(k_max, device=values.device)
    valid = k[None, :] < counts[:, None]                                            # [B, K]
    levels = ((k[None, :] + 0.5) / counts[:, None]).clamp(max=1.0).to(values.dtype)  # [B, K]
    sorted_values = values.sort(dim=1).values
    index = (levels * (N - 1)).round().long().clamp(0, N - 1)
    centroids = torch.where(valid, sorted_values.gather(1, index), torch.full_like(levels, float("inf")))
    ids = torch.zeros_like(values, dtype=torch.long)
    for _ in range(iterations):
        centroids = centroids.sort(dim=1).values
        midpoints = (centroids[:, :-1] + centroids[:, 1:]) / 2                     # inf beyond the valid ones
        ids = torch.searchsorted(midpoints.contiguous(), values.contiguous())
        sums = torch.zeros_like(centroids).scatter_add(1, ids, values)
        members = torch.zeros_like(centroids).scatter_add(1, ids, torch.ones_like(values))
        centroids = torch.where(members > 0, sums / members.clamp_min(1), centroids)
    return ids


def clustered_mse_kmeans(pred: Tensor, target: Tensor, counts: Tensor) -> Tensor:
    """Experimental ``--clustered_mse_mode kmeans`` (the source's mode): each element of d² replaced by the mean
    of its 1-D k-means cluster, with ``counts`` [B] clusters per sample (``kmeans_cluster_counts``: 4-100, driven
    by the loss map). Any partition keeps Σ_k n_k·mean_k = Σ d², so without a mask the per-sample mean equals
    MSE in value and in gradient, as for the quantile mode."""
    d2 = (pred - target).square()
    flat = d2.reshape(d2.shape[0], -1)
    ids = kmeans_1d(flat.detach(), counts.to(flat.device))
    return _cluster_means(flat, ids, int(counts.max())).reshape(d2.shape)


# ------------------------------------------------------------------------------------------------------------
# reduction
# ------------------------------------------------------------------------------------------------------------
def mask_like(mask: Tensor, loss: Tensor) -> Tensor:
    """A mask [B, 1, h, w] in [0, 1] resized to the loss's spatial size by area averaging (KS
    ``apply_masked_loss``: interpolate(mode="area")), fp32 [B, 1, H, W]: each latent pixel gets the mean of the
    mask over the image pixels it covers. A mask already at that size is returned as is."""
    mask = mask.to(device=loss.device, dtype=torch.float32)
    if mask.dim() == loss.dim() - 1:
        mask = mask.unsqueeze(1)
    if tuple(mask.shape[2:]) != tuple(loss.shape[2:]):
        mask = torch.nn.functional.interpolate(mask, size=tuple(loss.shape[2:]), mode="area")
    return mask


def per_sample_mean(loss: Tensor, mask: Tensor | None = None, renormalize: bool = False) -> Tensor:
    """Mean over the non-batch dims -> [B]. With a mask (broadcastable, e.g. [B, 1, H, W]): mean of loss·mask
    (KS masked loss), or with ``renormalize`` Σ loss·mask / Σ mask, the mean over the masked area only."""
    dims = tuple(range(1, loss.dim()))
    if mask is None:
        return loss.mean(dims)
    mask = mask.to(loss.dtype)
    masked = loss * mask
    if not renormalize:
        return masked.mean(dims)
    area = torch.broadcast_to(mask, loss.shape).sum(dims)
    return masked.sum(dims) / area.clamp_min(1e-8)


# ------------------------------------------------------------------------------------------------------------
# KS facade
# ------------------------------------------------------------------------------------------------------------
def conditional_loss(model_pred: Tensor, target: Tensor, loss_type: str = "l2", reduction: str = "mean",
                     huber_c: Tensor | float | None = None) -> Tensor:
    """KS ``train_util.conditional_loss``: loss_type l2 | l1 | huber | smooth_l1, reduction "none" | "mean" |
    "sum", huber_c a [B] tensor or a float (needed by huber and smooth_l1). Computed in fp32 whatever the input
    dtype (KS computes in the input's: fp16 overflows to NaN at |d| = 300 and rounds d² to 0 at |d| ≤ 1e-4), with
    the stable hypot forms; returns fp32. Values equal KS's fp32 values up to rounding."""
    if loss_type not in ("l2", "l1", "huber", "smooth_l1"):
        raise ValueError(f"conditional_loss: unsupported loss_type '{loss_type}'")
    if loss_type in THRESHOLD_LOSS_TYPES and huber_c is None:
        raise ValueError(f"conditional_loss: loss_type '{loss_type}' needs huber_c")
    if isinstance(huber_c, Tensor):
        huber_c = huber_c.float()
    loss = elementwise_loss(model_pred.float(), target.float(), loss_type, huber_c)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"conditional_loss: reduction must be 'none', 'mean' or 'sum', got '{reduction}'")
