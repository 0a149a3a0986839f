"""Timestep Attention: a dense map of recent loss per noise-level bin, and sampling from it.

Spec: ../shared/spec/losses-and-timesteps.md §5 (map, update, compression, mixing, distributed).
The ``--loss_map_offset`` weight (§4) reads ``values``; it lives with the other weights in library/weighting.py.
Bins: DDPM bin = t; flow bin = min(floor(σ·T), T − 1); T = 1000.

The map lives on the CPU in fp32: it is tiny (4 kB), every rank holds an identical copy, and the per-sample
update is sequential by definition, which a host loop over the gathered batch does faster than device kernels.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from library.errors import UserError

# Weight w_k of the OLD centre value in the target of the neighbour at distance k = 1..6 (spec §5): near
# neighbours follow the new loss almost fully, the 6th only half way.
NEIGHBOUR_WEIGHTS = (0.01, 0.03, 0.09, 0.25, 0.35, 0.50)
RADIUS = len(NEIGHBOUR_WEIGHTS)
# The same weights over offsets −6..6. The centre gets w_0 = 0: its spec rule M[b] += r·(L − m_old) is the
# neighbour rule with w = 0, because M[b] = m_old when it is applied. So one window op updates all 13 bins.
_WINDOW_WEIGHTS = np.array(NEIGHBOUR_WEIGHTS[::-1] + (0.0,) + NEIGHBOUR_WEIGHTS, dtype=np.float32)

COMPRESS_EPS = 1e-6  # the spec's guard against a flat map (max = mean = min)
STATE_KEY = "loss_map"  # the one tensor name in a loss-map .safetensors file

Gather = Callable[[Tensor], Tensor]


def compress(values: Tensor, p: float = 0.05) -> Tensor:
    """Pull the map towards its mean by at most a fraction p, keeping its sum (spec §5).

    ℓ > μ: ℓ·(1 − p·(ℓ − μ)/(max − μ + 1e−6)); otherwise ℓ·(1 + p·(μ − ℓ)/(μ − min + 1e−6)); then ×Σℓ/Σℓ′.
    The peak shrinks by p, the trough grows by p, so the sampler never starves or floods a bin.

    Oracle, by hand (1e−6 terms dropped, they move digits past the 7th): [1, 2, 3, 6], p = 0.05: μ = 3, max = 6,
    min = 1. 1 → 1·(1 + 0.05·2/2) = 1.05; 2 → 2·(1 + 0.05·1/2) = 2.05; 3 → 3; 6 → 6·(1 − 0.05·3/3) = 5.7.
    Sum 11.8 → ×12/11.8: [1.0677966, 2.0847458, 3.0508475, 5.7966102], sum 12.
    """
    values = values.double()
    mean, high, low = values.mean(), values.max(), values.min()
    shrunk = values * (1 - p * (values - mean) / (high - mean + COMPRESS_EPS))
    lifted = values * (1 + p * (mean - values) / (mean - low + COMPRESS_EPS))
    compressed = torch.where(values > mean, shrunk, lifted)
    return compressed * (values.sum() / compressed.sum())


def normalise(density: Tensor) -> Tensor:
    """A non-negative density over bins → probabilities (fp64 on the CPU)."""
    density = density.detach().to("cpu", torch.float64)
    return density / density.sum()


class LossMap:
    """The map M of T bins, flat at 1.0, updated with each sample's loss (spec §5).

    ``values`` is an fp32 CPU tensor [num_bins]; it is updated in place, so views of it stay valid."""

    def __init__(self, num_bins: int = 1000, update_rate: float = 0.5):
        if not 0.0 < update_rate <= 1.0:
            raise UserError(f"--loss_map_update_rate: {update_rate} is outside (0, 1]; 0.5 is the default")
        if num_bins <= 2 * RADIUS:
            raise ValueError(f"LossMap needs more than {2 * RADIUS} bins, got {num_bins}")
        self.num_bins = num_bins
        self.update_rate = update_rate
        self.values = torch.ones(num_bins, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------ update
    def update(self, bins: Tensor, losses: Tensor) -> None:
        """Apply each (bin b, loss L) in order (spec §5), rate r:

        m_old = M[b]; M[b] += r·(L − m_old); for k = 1..6, a = b ± k in range:
        M[a] += r·((1 − w_k)·L + w_k·m_old − M[a]).

        Sequential by definition (a sample reads the map as the previous one left it), so the loop is over
        samples and each sample's 13-bin window is one vectorised op on a numpy view of ``values``.
        Non-finite losses are skipped: one NaN would otherwise poison the map, and the sampler, for good.
        """
        bins_list = bins.detach().reshape(-1).long().tolist()  # one host sync for the whole gathered batch
        losses_list = losses.detach().reshape(-1).double().tolist()
        if len(bins_list) != len(losses_list):
            raise ValueError(f"LossMap.update: {len(bins_list)} bins but {len(losses_list)} losses")
        if bins_list and not 0 <= min(bins_list) <= max(bins_list) < self.num_bins:
            raise ValueError(f"LossMap.update: bins must lie in [0, {self.num_bins}), got {min(bins_list)}..{max(bins_list)}")
        m = self.values.numpy()  # shares memory with self.values
        r = self.update_rate
        for b, loss in zip(bins_list, losses_list):
            if not math.isfinite(loss):
                continue
            lo, hi = max(b - RADIUS, 0), min(b + RADIUS + 1, self.num_bins)
            w = _WINDOW_WEIGHTS[lo - (b - RADIUS): hi - (b - RADIUS)]
            window = m[lo:hi]  # a view: the += below writes into the map
            m_old = float(m[b])
            # target (1 − w)·L + w·m_old, written as L + w·(m_old − L) to save one array op
            window += r * (loss + w * (m_old - loss) - window)

    # ------------------------------------------------------------------------------------------ sampling
    def sampling_probs(self, base_density: Tensor, mix: float, compress_p: float = 0.05) -> Tensor:
        """P = (1 − λ)·P_map + λ·P_base over bins (spec §5), fp64 CPU [num_bins], sums to 1.

        P_map ∝ compress(M, p) over the bins the base sampler can reach (P_base > 0; mean, max and min taken
        there too), so ``--min_timestep`` / ``--max_timestep`` bound what the map proposes and the bins outside
        never distort it. P_base is ``base_density``
        normalised (any non-negative density over the same bins)."""
        if not 0.0 <= mix <= 1.0:
            raise UserError(f"--loss_map_mix: {mix} is outside [0, 1]; 0.1 is the default")
        if base_density.shape != self.values.shape:
            raise ValueError(f"base_density has shape {tuple(base_density.shape)}, the map {tuple(self.values.shape)}")
        p_base = normalise(base_density)
        # Compressed over the reachable bins only: the others never update and stay at 1.0, and counting them
        # would move the mean, max and min the compression pulls towards.
        support = p_base > 0
        attention = torch.zeros_like(p_base)
        if bool(support.any()):
            attention[support] = compress(self.values[support], compress_p).clamp_min(0)
        total = attention.sum()
        # A map with no mass on the base support (all-zero losses there) cannot propose anything: fall back.
        p_map = attention / total if total > 0 else p_base
        return (1 - mix) * p_map + mix * p_base

    def sample_bins(self, uniforms: Tensor, probs: Tensor) -> Tensor:
        """Inverse CDF over bins: bin i where CDF[i−1] ≤ U < CDF[i]; long, shape and device of ``uniforms``.

        Monotone in U, so strata and cluster slices of U become quantile slices of P. Zero-probability bins are
        never drawn (the right-sided search skips their empty intervals)."""
        cdf = torch.cumsum(normalise(probs), 0)
        cdf = cdf / cdf[-1]  # exactly 1 at the top, so every U < 1 lands in a bin
        bins = torch.searchsorted(cdf, uniforms.detach().to("cpu", torch.float64), right=True)
        return bins.clamp_(max=self.num_bins - 1).to(uniforms.device)

    # ------------------------------------------------------------------------------------------ weights
    @staticmethod
    def importance_weights(bins: Tensor, probs: Tensor, base_probs: Tensor) -> Tensor:
        """``--loss_map_unbiased``: w_i = P_base[b_i]/P[b_i], so E_P[w·L] = Σ_b P_base(b)·L(b), the base
        sampler's objective. Both inputs are normalised first. fp32 [B] on ``bins``' device."""
        index = bins.detach().cpu().long()
        p, p_base = normalise(probs)[index], normalise(base_probs)[index]
        # P = 0 bins are never drawn; 0 keeps a hand-made bin from producing inf.
        weights = torch.where(p > 0, p_base / p.clamp(min=1e-300), torch.zeros_like(p))
        return weights.float().to(bins.device)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"values": self.values.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self._load_values(sd["values"], "the saved training state")

    def _load_values(self, values: Tensor, where: str) -> None:
        if values.shape != self.values.shape:
            raise UserError(f"{where}: the loss map has shape {tuple(values.shape)}, expected ({self.num_bins},)")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise UserError(f"{where}: the loss map holds negative or non-finite values; it is not a loss map")
        self.values.copy_(values)  # in place: numpy views of values stay valid

    def save_file(self, path: str) -> None:
        """safetensors with one fp32 tensor named ``loss_map`` [num_bins]."""
        from safetensors.torch import save_file

        save_file({STATE_KEY: self.values.contiguous()}, path, metadata={"format": "loss_map"})

    def load_file(self, path: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(path)
        if STATE_KEY not in tensors:
            raise UserError(f"{path}: no tensor named '{STATE_KEY}' (found {sorted(tensors)}); is it a loss-map file?")
        self._load_values(tensors[STATE_KEY].float(), path)

    def load_csv(self, path: str) -> None:
        """Read a ``bin,loss`` CSV (``to_csv``): one row per bin, bins 0..T−1 in any order."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror})") from None
        if not lines or lines[0].replace(" ", "") != "bin,loss":
            raise UserError(f"{path}: not a loss-map CSV (expected the header 'bin,loss')")
        values = torch.full((self.num_bins,), float("nan"))
        for number, line in enumerate(lines[1:], start=2):
            try:
                b, v = line.split(",")
                values[int(b)] = float(v)
            except (ValueError, IndexError):
                raise UserError(f"{path} line {number}: '{line}' is not 'bin,loss' with a bin in "
                                f"[0, {self.num_bins})") from None
        if bool(torch.isnan(values).any()):
            raise UserError(f"{path}: {int(torch.isnan(values).sum())} of the {self.num_bins} bins have no row")
        self._load_values(values, path)

    def load_any(self, path: str, flag: str = "--loss_map_init") -> None:
        """A loss map from a ``.safetensors`` (tensor ``loss_map``) or a ``.csv`` (``bin,loss``) file."""
        try:
            self.load_csv(path) if path.lower().endswith(".csv") else self.load_file(path)
        except UserError as e:
            raise UserError(f"{flag}: {e}") from None
        except Exception as e:  # noqa: BLE001 - an unreadable file is the user's to fix
            raise UserError(f"{flag}: cannot read {path} as a loss map ({e})") from None

    def to_csv(self, path: str) -> None:
        """Two columns, ``bin,loss``, one row per bin."""
        rows = (f"{b},{v:.9g}" for b, v in enumerate(self.values.tolist()))
        with open(path, "w", encoding="utf-8") as f:
            f.write("bin,loss\n" + "\n".join(rows) + "\n")

    def to_png(self, path: str) -> None:
        """The map as a line plot (matplotlib's Agg canvas: no global backend switch, no display needed)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(8, 3), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot(np.arange(self.num_bins), self.values.numpy(), linewidth=1)
        axes.set_xlabel("noise-level bin (DDPM t; flow floor(σ·1000))")
        axes.set_ylabel("loss map")
        axes.set_xlim(0, self.num_bins - 1)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path)


def gathered_update(loss_map: LossMap, bins: Tensor, losses: Tensor, gather: Gather | None) -> None:
    """Update ``loss_map`` with every rank's (bin, loss), in rank order (spec §5, distributed).

    ``gather`` is ``accelerator.gather`` (concatenates along dim 0 in rank order) or None on one process.
    Every rank applies the same sequence, so the maps stay identical without broadcasting them. Ranks may hold
    different batch sizes (a last, smaller batch): each pads to the longest with bin −1, dropped after gathering.
    """
    bins, losses = bins.detach().reshape(-1).long(), losses.detach().reshape(-1).float()
    if gather is not None:
        sizes = gather(torch.tensor([bins.numel()], device=bins.device))
        padding = int(sizes.max()) - bins.numel()
        bins = gather(torch.nn.functional.pad(bins, (0, padding), value=-1))
        losses = gather(torch.nn.functional.pad(losses, (0, padding)))
        real = bins >= 0
        bins, losses = bins[real], losses[real]
    loss_map.update(bins, losses)
