"""Learned per-noise-level loss weighting (``--loss_weighting learned``), in the form of EDM2.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", §5 / Appendix B.2
("uncertainty-based loss weighting"): a small network u(σ) of the noise level alone is trained jointly with the
model, and each sample's loss L (here after every other weight) becomes

    L/exp(u(σ)) + u(σ).

For a fixed σ the minimiser of E[L]/e^u + u is u = log E[L | σ], so u tracks the log of the expected loss at each
noise level and L/e^u normalises every noise level to ≈ 1: the model sees balanced gradients across σ without a
hand-made weight (the "automatic weighting" of the first seed). u takes gradient 1 − L·e^{−u}; the model takes
the gradient of L scaled by e^{−u}.

u(σ): the input is the noise fraction x ∈ [0, 1] every family already has (DDPM t/T, flow σ; the loss map's
axis), not EDM2's c_noise = ln(σ_EDM)/4: EDM2 samples σ log-normally, so its samples are spread over c_noise, while
our samplers spread them over t, and in c_noise the first 1 % of DDPM timesteps (SNR 1175 → 100) would fill a fifth
of the axis with almost no samples, where u wandered off by 20 in a test run. Fixed random Fourier features
√2·cos(2π(f·x + φ)) (EDM2 MPFourier) go through Linear-SiLU-Linear, the last layer starting at 0 (u ≈ 0.001, the
plain loss, at step 0). Everything is initialised from a fixed seed, so every rank and every run starts from the
same u.

The learned weight e^{−u} is bounded like the timestep weights (library/weighting.MAX_TIMESTEP_WEIGHT): u has the
smooth floor u = −ln W + softplus(raw + ln W), W = 1000, so a noise level whose loss tends to 0 (ε-prediction at
SNR = 0 is the identity) cannot blow its weight up, and the gradient of u never vanishes.

u has its own Adam (lr ``--loss_weighting_lr``, 0.005, betas (0.9, 0.99) as EDM2), stepped with the LoRA's
optimizer step: the LoRA learning rate (1e-4) would need ~10⁵ steps to move u by the few units it must travel,
and adaptive optimizers (Prodigy, D-Adaptation) estimate their step size for the LoRA, not for u.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from library.errors import UserError
from library.weighting import MAX_TIMESTEP_WEIGHT

NUM_FEATURES = 64
HIDDEN = 64
INIT_SEED = 20240607            # fixed: every rank and run starts from the same network
U_FLOOR = -math.log(MAX_TIMESTEP_WEIGHT)  # e^{−u} ≤ MAX_TIMESTEP_WEIGHT
ADAM_BETAS = (0.9, 0.99)        # EDM2's Adam betas
FILE_FORMAT = "learned_loss_weighting-v1"


class LogVarianceNet(nn.Module):
    """u(σ): Fourier features of the noise fraction -> Linear -> SiLU -> Linear(1), with u's smooth floor.
    Input: noise fractions [B] in [0, 1] (DDPM t/T, flow σ)."""

    def __init__(self, num_features: int = NUM_FEATURES, hidden: int = HIDDEN):
        super().__init__()
        g = torch.Generator().manual_seed(INIT_SEED)
        self.register_buffer("frequencies", torch.randn(num_features, generator=g))
        self.register_buffer("phases", torch.rand(num_features, generator=g))
        self.hidden = nn.Linear(num_features, hidden)
        self.out = nn.Linear(hidden, 1)
        bound = 1 / math.sqrt(num_features)
        with torch.no_grad():
            self.hidden.weight.uniform_(-bound, bound, generator=g)
            self.hidden.bias.uniform_(-bound, bound, generator=g)
            self.out.weight.zero_()
            self.out.bias.zero_()

    def features(self, noise_fraction: Tensor) -> Tensor:
        x = noise_fraction.float().clamp(0.0, 1.0).to(self.frequencies.device)
        return math.sqrt(2) * torch.cos(2 * math.pi * (x[:, None] * self.frequencies + self.phases))

    def forward(self, noise_fraction: Tensor) -> Tensor:
        raw = self.out(torch.nn.functional.silu(self.hidden(self.features(noise_fraction)))).squeeze(-1)
        # smooth floor at −ln W (≈ raw above it; at raw = 0, u = ln(1 + 1/W) ≈ 0.001)
        return U_FLOOR + torch.nn.functional.softplus(raw - U_FLOOR)


def learned_objective(weighted: Tensor, u: Tensor) -> Tensor:
    """EDM2's per-sample objective L/exp(u) + u ([B]); its minimiser over u is log E[L]."""
    return weighted * torch.exp(-u) + u


class LearnedWeighting:
    """u(σ) with its own Adam; ``state_dict`` / ``load_state_dict`` cover both (saved in the training state)."""

    def __init__(self, lr: float = 0.005, device: torch.device | str | None = None):
        self.net = LogVarianceNet()
        if device is not None:
            self.net.to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, betas=ADAM_BETAS)

    def to(self, device) -> "LearnedWeighting":
        self.net.to(device)  # the same Parameter objects: the optimizer keeps them
        return self

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def __call__(self, noise_fraction: Tensor) -> Tensor:
        return self.net(noise_fraction)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """One Adam step on the accumulated (and, with several processes, all-reduced) gradients of u. With fp16's
        GradScaler (the loss, so u's gradients, was scaled) through `scaler.step`: unscaled, skipped on inf/NaN."""
        if scaler is not None and any(p.grad is not None for p in self.net.parameters()):
            scaler.step(self.optimizer)  # (GradScaler refuses an optimizer without gradients)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def curve(self, noise_fraction: Tensor) -> Tensor:
        """u at the given noise fractions (fp64 CPU), for plots and tables."""
        return self.net(noise_fraction.to(self.net.frequencies.device)).double().cpu()

    def state_dict(self) -> dict:
        return {"net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.net.load_state_dict(sd["net"])
        self.optimizer.load_state_dict(sd["optimizer"])

    # ------------------------------------------------------------------------------------------ files
    def save_file(self, path: str) -> None:
        """The network's tensors as safetensors (what ``tools/show_timesteps.py --learned_weights`` reads)."""
        from safetensors.torch import save_file

        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.net.state_dict().items()}, path,
                  metadata={"format": FILE_FORMAT})

    @classmethod
    def from_file(cls, path: str, flag: str = "--learned_weights") -> "LearnedWeighting":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(path, framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
            tensors = load_file(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's mistake to fix
            raise UserError(f"{flag}: cannot read {path} ({e})") from None
        if fmt != FILE_FORMAT:
            raise UserError(f"{flag}: {path} is not a learned_weighting.safetensors file (format {fmt!r}); use the "
                            "one in a state folder of a run with --loss_weighting learned")
        weighting = cls()
        weighting.net.load_state_dict(tensors)
        return weighting

    def to_png(self, path: str, index: Tensor, noise_fraction: Tensor, xlabel: str) -> None:
        """u and the weight e^{−u} over the noise-level grid (matplotlib Agg canvas, no display)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(8, 3), dpi=100)
        FigureCanvasAgg(figure)
        draw_curve(figure, index.numpy(), self.curve(noise_fraction).numpy(), xlabel)
        figure.tight_layout()
        figure.savefig(path)


def draw_curve(figure, index: np.ndarray, u: np.ndarray, xlabel: str) -> None:
    """Two panels on ``figure``: u(σ) (≈ log of the expected loss) and the learned weight e^{−u}."""
    left, right = figure.subplots(1, 2)
    left.plot(index, u, color="tab:blue")
    left.set_title("learned u(σ) ≈ log E[loss]", fontsize=9)
    right.plot(index, np.exp(-u), color="tab:red")
    right.set_yscale("log")
    right.set_title("learned weight exp(−u)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xlim(index[0], index[-1])
        ax.grid(alpha=0.3)
