"""Loss curves that mean something: a timestep-normalised loss, per-noise-band losses, the timestep-sampling
histogram and a steps × noise-band heatmap (spec §7, "What to log"; validation loss lives in library/validation.py).

Why: a diffusion model's loss depends far more on the noise level t than on training progress (ε-prediction
MSE falls by two orders of magnitude from t = 0 to t = 999), so a raw per-step loss curve mostly shows which
timesteps the batch happened to draw. Here every sample's loss L_i is compared with what is usual at its
noise level:

    loss/normalized          = mean_i L_i / E[b_i]       E: an always-on EMA map over the T = 1000 bins, read BEFORE
                                                         this step's losses enter it. ≈ 1 when nothing changes; < 1
                                                         when the model beats its own recent loss at those levels;
                                                         spikes when a batch is unusually hard, whatever its t.
    loss/timestep_bin/00..09 = EMA of L over samples in tenth j of the noise range (bins 100·j .. 100·j + 99):
                               the trend per noise band, free of the draw-to-draw mixture of bands.
    timestep histogram       = how many samples fell in each tenth (what the sampler actually drew).
    heatmap                  = a row of the ten band EMAs every --heatmap_every_n_steps steps (steps × bands).

Every rank feeds the same all-gathered (bin, loss) pairs, so every rank holds the same state and logs the same.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from library.errors import UserError

NUM_BINS = 1000           # T: DDPM bin = t, flow bin = min(floor(σ·T), T − 1) (spec §5)
NUM_BANDS = 10            # loss/timestep_bin/00..09: ten equal tenths of the bin range
FINE_RATE = 0.1           # EMA rate of the fine map per unit of kernel weight (a sample gives weight 1 to its bin)
FINE_BANDWIDTH = 10.0     # Gaussian smoothing of the fine map, in bins (std); the kernel is cut at 3 std
BAND_RATE = 0.05          # EMA rate of a band per sample in it: an estimate from the last ≈ 2/r = 40 samples


def band_of(bins: Tensor, num_bins: int = NUM_BINS, num_bands: int = NUM_BANDS) -> Tensor:
    """Band j = floor(b·J/T) of each bin b (long): bins 0..99 → 0, ..., 900..999 → 9 for T = 1000, J = 10."""
    return torch.div(bins.long() * num_bands, num_bins, rounding_mode="floor").clamp(0, num_bands - 1)


def gaussian_kernel(bandwidth: float, radius: int | None = None) -> Tensor:
    """k(d) = exp(−d²/(2h²)) for d = −R..R (fp64), R = ceil(3h); peak 1, so a sample gives its own bin weight 1."""
    radius = int(math.ceil(3 * bandwidth)) if radius is None else radius
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return torch.exp(-0.5 * (d / bandwidth) ** 2) if bandwidth > 0 else (d == 0).double()


def debiased_ema_update(sums: Tensor, weights: Tensor, batch_sums: Tensor, batch_weights: Tensor,
                        rate: float) -> None:
    """One batched, bias-corrected EMA step per bin, in place (all fp64, same shape).

    With n_b = ``batch_weights`` (this batch's weight in bin b) and m_b = ``batch_sums``/n_b (its weighted mean):
        decay_b = (1 − r)^{n_b};  S_b ← decay_b·S_b + (1 − decay_b)·m_b;  W_b ← decay_b·W_b + (1 − decay_b)
    and the estimate is S_b / W_b (undefined while W_b = 0: the bin was never seen).

    For n_b = 1 this is the textbook EMA S ← (1 − r)·S + r·L; n samples of equal loss act as n sequential updates,
    unequal ones enter through their mean (a batch has no order). W is the EMA of a constant 1 started at 0, so
    S/W is Adam's bias correction (Kingma & Ba 2015, §3): no start-up pull towards the zero initialisation.
    """
    decay = torch.pow(1.0 - rate, batch_weights)
    mean = batch_sums / batch_weights.clamp_min(1e-300)
    sums.mul_(decay).add_((1.0 - decay) * mean)
    weights.mul_(decay).add_(1.0 - decay)


def nearest_seen(values: Tensor, seen: Tensor) -> Tensor:
    """``values`` with every unseen entry replaced by the value of the nearest seen index (ties: the lower one);
    all NaN when nothing is seen."""
    index = torch.nonzero(seen).reshape(-1)
    if index.numel() == 0:
        return torch.full_like(values, float("nan"))
    positions = torch.arange(values.numel())
    right = torch.searchsorted(index, positions).clamp(max=index.numel() - 1)
    left = (right - 1).clamp(min=0)
    pick_left = (positions - index[left]).abs() <= (index[right] - positions).abs()
    return values[torch.where(pick_left, index[left], index[right])]


class LossMetrics:
    """Normalised loss, band EMAs, sampling histogram and heatmap rows, fed with every rank's (bin, raw loss).

    Per micro-batch: ``observe(bins, losses)`` with the all-gathered per-sample raw losses and their bins. Per
    optimizer step: ``logs = step_logs(step)`` (scalars for accelerator.log; appends a heatmap row every
    ``heatmap_every`` steps). Any time: ``heatmap_image()``, ``timestep_histogram()``, ``state_dict()``.

    The fine map is its own kernel-smoothed, bias-corrected EMA, not library/loss_map.LossMap, because a
    denominator must be (1) defined only where losses were seen: LossMap starts flat at 1.0, so early ratios would
    be L/1, not L over anything measured; (2) low-variance: LossMap's rate 0.5 follows the last one or two samples
    of a bin, and E[L/M] exceeds 1 by about the squared coefficient of variation of M (Jensen); here a Gaussian
    kernel (std ``bandwidth`` bins) pools neighbouring bins, whose losses differ little, and the rate is 0.1, so
    each estimate averages ≈ 20 samples; (3) order-free and vectorised: one batched update per micro-batch instead
    of LossMap's sequential per-sample loop. Bins no sample has reached yet (beyond the kernel) borrow the value of
    the nearest seen bin; before anything is seen at all, a sample is compared with itself (ratio 1).
    """

    def __init__(self, num_bins: int = NUM_BINS, num_bands: int = NUM_BANDS, fine_rate: float = FINE_RATE,
                 bandwidth: float = FINE_BANDWIDTH, band_rate: float = BAND_RATE, heatmap_every: int = 50):
        if not (0 < fine_rate <= 1 and 0 < band_rate <= 1):
            raise ValueError(f"EMA rates must lie in (0, 1], got {fine_rate}, {band_rate}")
        if heatmap_every < 1:
            raise ValueError(f"heatmap_every must be >= 1, got {heatmap_every}")
        self.num_bins, self.num_bands = num_bins, num_bands
        self.fine_rate, self.band_rate, self.heatmap_every = fine_rate, band_rate, heatmap_every
        self.kernel = gaussian_kernel(bandwidth)
        self.fine_sums = torch.zeros(num_bins, dtype=torch.float64)
        self.fine_weights = torch.zeros(num_bins, dtype=torch.float64)
        self.band_sums = torch.zeros(num_bands, dtype=torch.float64)
        self.band_weights = torch.zeros(num_bands, dtype=torch.float64)
        self.band_counts = torch.zeros(num_bands, dtype=torch.int64)      # all samples ever, per band
        self.heatmap_steps: list[int] = []
        self.heatmap_rows: list[Tensor] = []                               # [num_bands] fp64 each, NaN = unseen
        # Since the last step_logs / timestep_histogram call (not state: a resumed step starts empty).
        self._ratio_sum, self._ratio_count = 0.0, 0
        self._window_counts = torch.zeros(num_bands, dtype=torch.int64)

    # ------------------------------------------------------------------------------------------ estimates
    def fine_estimate(self) -> Tensor:
        """E[b] = S_b/W_b [num_bins] fp64; unseen bins take the nearest seen bin's value (all NaN before any)."""
        seen = self.fine_weights > 0
        estimate = torch.where(seen, self.fine_sums / self.fine_weights.clamp_min(1e-300),
                               torch.full_like(self.fine_sums, float("nan")))
        return nearest_seen(estimate, seen)

    def band_estimate(self) -> Tensor:
        """EMA loss per band [num_bands] fp64, NaN for a band no sample has fallen in yet."""
        seen = self.band_weights > 0
        return torch.where(seen, self.band_sums / self.band_weights.clamp_min(1e-300),
                           torch.full_like(self.band_sums, float("nan")))

    def normalized(self, bins: Tensor, losses: Tensor) -> Tensor:
        """L_i / E[b_i] [B] fp64 against the current map (a sample is its own reference before any is seen)."""
        bins, losses = bins.detach().reshape(-1).long().cpu(), losses.detach().reshape(-1).double().cpu()
        reference = self.fine_estimate()[bins]
        reference = torch.where(torch.isfinite(reference) & (reference > 0), reference, losses)
        ratio = losses / reference
        return torch.where(reference > 0, ratio, torch.ones_like(ratio))  # 0/0 (a perfect model) counts as 1

    # ------------------------------------------------------------------------------------------ feeding
    def observe(self, bins: Tensor, losses: Tensor) -> None:
        """Feed one micro-batch of every rank's (bin, raw per-sample loss). The normalised ratios use the map as
        it was before this call; then the fine map, the bands and the histogram take the samples in.
        Non-finite losses are dropped (one NaN would poison an EMA for good)."""
        bins, losses = bins.detach().reshape(-1).long().cpu(), losses.detach().reshape(-1).double().cpu()
        if bins.numel() != losses.numel():
            raise ValueError(f"LossMetrics.observe: {bins.numel()} bins but {losses.numel()} losses")
        keep = torch.isfinite(losses)
        bins, losses = bins[keep], losses[keep]
        if bins.numel() == 0:
            return
        if not 0 <= int(bins.min()) <= int(bins.max()) < self.num_bins:
            raise ValueError(f"LossMetrics.observe: bins must lie in [0, {self.num_bins}), got "
                             f"{int(bins.min())}..{int(bins.max())}")
        ratios = self.normalized(bins, losses)
        self._ratio_sum += float(ratios.sum())
        self._ratio_count += ratios.numel()

        # Fine map: per-bin count and loss sum, spread over neighbours by the kernel (one conv per micro-batch).
        counts = torch.bincount(bins, minlength=self.num_bins).double()
        sums = torch.bincount(bins, weights=losses, minlength=self.num_bins)
        pad = (self.kernel.numel() - 1) // 2
        smooth = lambda x: torch.nn.functional.conv1d(x.view(1, 1, -1), self.kernel.view(1, 1, -1),  # noqa: E731
                                                      padding=pad).view(-1)
        debiased_ema_update(self.fine_sums, self.fine_weights, smooth(sums), smooth(counts), self.fine_rate)

        bands = band_of(bins, self.num_bins, self.num_bands)
        band_counts = torch.bincount(bands, minlength=self.num_bands)
        band_sums = torch.bincount(bands, weights=losses, minlength=self.num_bands)
        debiased_ema_update(self.band_sums, self.band_weights, band_sums, band_counts.double(), self.band_rate)
        self.band_counts += band_counts
        self._window_counts += band_counts

    def step_logs(self, step: int) -> dict[str, float]:
        """Scalars after optimizer step ``step``: loss/normalized (mean ratio over the samples observed since the
        last call; absent if none) and loss/timestep_bin/JJ for every band seen so far. Every ``heatmap_every``
        steps the band EMAs are appended as a heatmap row."""
        logs: dict[str, float] = {}
        if self._ratio_count:
            logs["loss/normalized"] = self._ratio_sum / self._ratio_count
        self._ratio_sum, self._ratio_count = 0.0, 0
        bands = self.band_estimate()
        for j, value in enumerate(bands.tolist()):
            if math.isfinite(value):
                logs[f"loss/timestep_bin/{j:02d}"] = value
        if step % self.heatmap_every == 0:
            self.add_heatmap_row(step)
        return logs

    def add_heatmap_row(self, step: int) -> bool:
        """Append the band EMAs as the heatmap row of ``step`` (once per step; not before any loss was seen), e.g.
        at a save or at the end of training, so a short run has a heatmap too. Returns whether a row exists."""
        if self.heatmap_steps and self.heatmap_steps[-1] == int(step):
            return True
        bands = self.band_estimate()
        if not bool(torch.isfinite(bands).any()):
            return False
        self.heatmap_steps.append(int(step))
        self.heatmap_rows.append(bands.clone())
        return True

    # ------------------------------------------------------------------------------------------ histogram
    def band_edges(self) -> np.ndarray:
        """Bin-index edges of the bands [num_bands + 1]: 0, 100, ..., 1000."""
        return np.linspace(0, self.num_bins, self.num_bands + 1)

    def timestep_histogram(self, reset: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(counts per band since the last reset [num_bands] int64, band edges [num_bands + 1])."""
        counts = self._window_counts.numpy().copy()
        if reset:
            self._window_counts.zero_()
        return counts, self.band_edges()

    # ------------------------------------------------------------------------------------------ heatmap
    def heatmap_array(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps [R], band EMAs [R, num_bands] with NaN for unseen bands)."""
        if not self.heatmap_rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.num_bands))
        return np.asarray(self.heatmap_steps), torch.stack(self.heatmap_rows).numpy()

    def heatmap_image(self, relative: bool = False, width: float = 6.4, height: float = 4.0, dpi: int = 80) -> np.ndarray:
        """The heatmap as an HWC uint8 RGB array (tensorboard ``add_image(tag, img, step, dataformats="HWC")``).

        x: noise band (bins 100·j ..), y: step (downwards), colour: band EMA loss on a log scale (losses span
        decades across t). ``relative``: each band divided by its first value, so colour reads "how far this band
        has come" (1 = no change). Drawn on matplotlib's Agg canvas (no global backend switch, no display)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure

        steps, rows = self.heatmap_array()
        figure = Figure(figsize=(width, height), dpi=dpi)
        canvas = FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        if rows.shape[0]:
            if relative:
                first = np.array([col[np.isfinite(col)][0] if np.isfinite(col).any() else np.nan for col in rows.T])
                rows = rows / first
            values = np.ma.masked_invalid(rows)
            positive = values.compressed()
            positive = positive[positive > 0]
            norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 1.0001)) \
                if positive.size else None
            half_step = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
            image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm,
                                extent=(0, self.num_bins, steps[-1] + half_step, steps[0] - half_step))
            figure.colorbar(image, ax=axes, label="loss / first row" if relative else "EMA loss (log scale)")
        axes.set_xlabel("noise level: timestep bin (DDPM t; flow ⌊1000σ⌋)")
        axes.set_ylabel("optimizer step")
        axes.set_xticks(self.band_edges())
        axes.set_title("per-band EMA loss" + (" relative to the first row" if relative else ""))
        figure.tight_layout()
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        steps, rows = self.heatmap_array()
        return {"fine_sums": self.fine_sums.clone(), "fine_weights": self.fine_weights.clone(),
                "band_sums": self.band_sums.clone(), "band_weights": self.band_weights.clone(),
                "band_counts": self.band_counts.clone(), "heatmap_steps": torch.as_tensor(steps, dtype=torch.int64),
                "heatmap_rows": torch.as_tensor(rows, dtype=torch.float64)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["fine_sums"].shape != self.fine_sums.shape or sd["band_sums"].shape != self.band_sums.shape:
            raise UserError(f"--resume: the saved loss metrics have {sd['fine_sums'].numel()} bins and "
                            f"{sd['band_sums'].numel()} bands, this run {self.num_bins} and {self.num_bands}")
        for name in ("fine_sums", "fine_weights", "band_sums", "band_weights", "band_counts"):
            getattr(self, name).copy_(sd[name])
        self.heatmap_steps = [int(s) for s in sd["heatmap_steps"].tolist()]
        self.heatmap_rows = [row.clone().double() for row in sd["heatmap_rows"]]


def gathered_samples(bins: Tensor, losses: Tensor, gather: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, Tensor]:
    """Every rank's (bins, losses), concatenated in rank order; ``gather`` is accelerator.gather (None: one
    process). Ranks may hold different batch sizes: each pads to the longest with bin −1, dropped afterwards."""
    bins, losses = bins.detach().reshape(-1).long(), losses.detach().reshape(-1).float()
    if gather is None:
        return bins, losses
    sizes = gather(torch.tensor([bins.numel()], device=bins.device))
    padding = int(sizes.max()) - bins.numel()
    bins = gather(torch.nn.functional.pad(bins, (0, padding), value=-1))
    losses = gather(torch.nn.functional.pad(losses.to(bins.device), (0, padding)))
    real = bins >= 0
    return bins[real], losses[real]


def histogram_raw_kwargs(counts: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    """Arguments of tensorboard ``SummaryWriter.add_histogram_raw(tag, **kwargs, global_step=step)`` for band
    counts (each sample placed at its band's centre for sum / sum_squares)."""
    counts = np.asarray(counts, dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    used = np.nonzero(counts)[0]
    low, high = (edges[used[0]], edges[used[-1] + 1]) if used.size else (edges[0], edges[-1])
    return {"min": float(low), "max": float(high), "num": int(counts.sum()), "sum": float((counts * centres).sum()),
            "sum_squares": float((counts * centres**2).sum()), "bucket_limits": edges[1:].tolist(),
            "bucket_counts": counts.tolist()}


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------
def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """Logging and validation flags (KS names where KS has them: validation_split, validation_seed,
    validate_every_n_steps, validate_every_n_epochs)."""
    g = parser.add_argument_group("metrics and validation", "see docs/loss-curves.md")
    g.add_argument("--heatmap_every_n_steps", type=int, default=50,
                   help="append a row of the ten per-band EMA losses to the loss heatmap every N steps (default 50)")
    g.add_argument("--max_validation_steps", type=int, default=None,
                   help="validate on the first N validation batches only (KS); default: all")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="share in [0, 1) of each --train_data_dir subset held out for validation (KS); a dataset "
                        "TOML sets it per dataset")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the validation split and of the fixed validation noise (default: --seed)")
    g.add_argument("--validate_every_n_steps", type=int, default=None,
                   help="compute the validation loss every N optimizer steps")
    g.add_argument("--validate_every_n_epochs", type=int, default=None,
                   help="compute the validation loss every N epochs (default: every epoch when there are "
                        "validation images, as KS)")
    g.add_argument("--validation_timesteps", type=int, default=10,
                   help="number of fixed, equidistant noise levels of the validation loss (default 10)")


def validate_metric_options(args: argparse.Namespace) -> None:
    """Reject bad metric / validation flag values before any model loads."""
    every = getattr(args, "heatmap_every_n_steps", 50)
    if every is None or every < 1:
        raise UserError(f"--heatmap_every_n_steps: {every} must be a positive integer (default 50)")
    split = getattr(args, "validation_split", None)
    if split is not None and not (isinstance(split, (int, float)) and 0.0 <= split < 1.0):
        raise UserError(f"--validation_split: {split} must lie in [0, 1), e.g. 0.1 holds out 10% of the images")
    for flag in ("validate_every_n_steps", "validate_every_n_epochs"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag}: {value} must be a positive integer (omit it to disable)")
    levels = getattr(args, "validation_timesteps", 10)
    if levels is None or not 1 <= levels <= NUM_BINS:
        raise UserError(f"--validation_timesteps: {levels} must be an integer in [1, {NUM_BINS}] (default 10)")
    seed = getattr(args, "validation_seed", None)
    if seed is not None and seed < 0:
        raise UserError(f"--validation_seed: {seed} must be >= 0")
    asked = getattr(args, "validate_every_n_steps", None) or getattr(args, "validate_every_n_epochs", None)
    if asked and not split and not getattr(args, "dataset_config", None):
        raise UserError("--validate_every_n_steps/--validate_every_n_epochs need validation images: set "
                        "--validation_split 0.1 (or is_val / validation_split in a --dataset_config TOML)")
