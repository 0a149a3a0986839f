"""LossEngine: the one place a step's timesteps, noise, targets and loss are formed.

Spec: ../shared/spec/losses-and-timesteps.md. One step, in the spec's order (§0):

    levels = engine.sample_levels(step, B, micro_step)      uniforms (per-rank generator) -> strata -> cluster slice
                                                             -> sampler inverse CDF (or loss map) -> t / σ, bins, SNR
    noise = engine.sample_noise(latents, step, micro_step)   ε (+ offset / multires noise), same generator family
    noisy, target = engine.make_inputs(latents, noise, levels)   (+ input perturbation)
    result = engine.loss(pred, target, levels, step, ...)    elementwise (fp32) -> mask -> per-sample mean [B]
                                                             -> weights: dataset · importance · timestep (§4 order)
                                                             -> plain batch mean
    engine.record(result, levels, gather)                    loss-map update with every rank's (bin, loss)

Every random draw is keyed on (seed, step, rank, micro_step, stream) (library/rng.py): a resumed run draws what
the uninterrupted one drew, and the only state is the loss map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from library import families, rng
from library.learned_weighting import LearnedWeighting, learned_objective
from library.loss_config import PREDICTION_TYPES, LossConfig
from library.losses import (THRESHOLD_LOSS_TYPES, clustered_mse, clustered_mse_kmeans, combined_loss,
                            elementwise_loss, ew_blend, ew_loss, huber_threshold, kmeans_cluster_counts, map_position,
                            mask_like, per_sample_mean)
from library.objective import (ddpm_noisy, flow_noisy, flow_velocity_target, input_perturbation, multires_noise,
                               offset_noise, prediction_to_loss_space, v_target)
from library.schedules import (DDPMSchedule, FlowSchedule, TimestepRange, rescale_zero_terminal_snr,
                               sd_alphas_cumprod)
from library.timesteps import (IMAGE_DEPENDENT, STEP_DEPENDENT, Sampler, bin_probabilities, build_sampler,
                               cluster_slice, image_tokens, stratified)
from library.weighting import timestep_weights

try:  # library/loss_map.py is written by another helper; everything but the loss map works without it
    from library.loss_map import LossMap, gathered_update
except ImportError:  # pragma: no cover - only while the module is missing
    LossMap, gathered_update = None, None

U_MAX_FP32 = 1.0 - 2.0**-24  # the largest fp32 below 1: u is reported in [0, 1)


@dataclass
class NoiseLevels:
    u: Tensor               # [B] float in [0, 1): noise fraction
    timesteps: Tensor       # [B] model input: DDPM long t; flow float 1000σ
    bins: Tensor            # [B] long in [0, 999]
    snr: Tensor             # [B] float (schedule actually in use)
    sigma: Tensor | None    # [B] flow σ (None for DDPM)
    sample_weight: Tensor   # [B] importance weights (loss_map_unbiased), ones otherwise
    step: int = 0           # the key of the draws that follow (input perturbation in make_inputs)
    micro_step: int = 0


@dataclass
class LossResult:
    loss: Tensor            # scalar, what backward() gets
    raw: Tensor             # [B] per-sample loss before any weight (after mask)
    weighted: Tensor        # [B] per-sample loss after all weights


class LossEngine:
    def __init__(self, cfg: LossConfig, family_kind: str, prediction_type: str, alphas_cumprod: Tensor | None,
                 seed: int, rank: int, world_size: int, max_train_steps: int, zero_terminal_snr: bool = False,
                 flow_shift: float = 1.0, grad_accum_steps: int = 1):
        """``family_kind`` "ddpm" | "flow" (a family name "sd1" | "sdxl" | "sd3" also works);
        ``prediction_type`` as ``cfg.prediction_type`` ("flow_x0" under --precondition_outputs);
        ``alphas_cumprod`` the model scheduler's ᾱ before any zero-terminal-SNR rescale (None: the SD default
        schedule; ignored for flow); ``flow_shift`` the σ shift used when --timestep_shift is left at 1."""
        kind = families.kind_of(family_kind, default=family_kind)
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"unknown family kind '{family_kind}' (ddpm, flow)")
        if prediction_type not in PREDICTION_TYPES[kind]:
            raise ValueError(f"prediction type '{prediction_type}' is not a {kind} one {PREDICTION_TYPES[kind]}")
        if world_size < 1 or not 0 <= rank < world_size or grad_accum_steps < 1:
            raise ValueError(f"bad process layout: rank {rank}, world_size {world_size}, "
                             f"accumulation {grad_accum_steps}")
        self.cfg, self.kind, self.prediction_type = cfg, kind, prediction_type
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.max_train_steps, self.grad_accum_steps = max(int(max_train_steps), 1), grad_accum_steps
        self.range = TimestepRange(cfg.min_timestep, cfg.max_timestep)
        if kind == "ddpm":
            ab = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
            if zero_terminal_snr or cfg.zero_terminal_snr:
                ab = rescale_zero_terminal_snr(ab)  # idempotent: an already rescaled ᾱ stays as it is
            self.schedule: DDPMSchedule | FlowSchedule = DDPMSchedule(ab)
        else:
            self.schedule = FlowSchedule(cfg.timestep_shift if cfg.timestep_shift != 1.0 else flow_shift)
        self.num_bins = self.schedule.num_train_timesteps
        self.bin_edges_u = self.schedule.bin_edges_u(self.range)
        # The bins training can reach (--min_timestep/--max_timestep, flow's σ ≥ 1/T): loss-map statistics are
        # taken over these only, since the others are never updated and stay at their initial 1.0.
        self.trained_bins = self.bin_edges_u[1:] > self.bin_edges_u[:-1]
        self.sampler_params = cfg.sampler_params()
        self.weight_options = cfg.weight_options()
        # Built once unless the sampler changes with the step or the image size.
        name = cfg.loss_map_base_sampling if cfg.timestep_sampling == "loss_map" else cfg.timestep_sampling
        varies = name in STEP_DEPENDENT | IMAGE_DEPENDENT
        self._fixed_sampler = None if varies else build_sampler(name, self.sampler_params)
        self.loss_map = None
        self.base_bin_probs: Tensor | None = None  # loss_map sampling: P_base over bins (fp64), what the map mixes with
        if cfg.needs_loss_map:
            if LossMap is None:
                raise RuntimeError("this configuration needs library/loss_map.py (LossMap), which is missing")
            self.loss_map = LossMap(self.num_bins, cfg.loss_map_update_rate)
            if cfg.loss_map_init:
                self.loss_map.load_any(cfg.loss_map_init, "--loss_map_init")
        # --loss_weighting learned: u(σ) and its optimizer (the loop moves it to the device and steps it)
        self.learned = LearnedWeighting(cfg.loss_weighting_lr) if cfg.loss_weighting == "learned" else None
        if cfg.timestep_sampling == "loss_map":
            self.base_bin_probs = bin_probabilities(self._fixed_sampler, self.bin_edges_u)

    # ------------------------------------------------------------------------------------------ timesteps
    def cluster_for_step(self, step: int) -> int | None:
        """The timestep cluster k of an optimizer step (None when --timestep_clusters is off); drawn from the
        rank-independent generator, so every rank and every micro-batch of the step agree."""
        K = self.cfg.timestep_clusters
        if not K:
            return None
        generator = rng.shared_generator(self.seed, step, rng.STREAM_CLUSTER)
        return int(torch.randint(K, (1,), generator=generator))

    def sampler_at(self, step: int, latent_shape: tuple[int, ...] | None = None) -> Sampler:
        """The base sampler in effect at ``step`` (for flux_shift: for latents of ``latent_shape``)."""
        if self._fixed_sampler is not None:
            return self._fixed_sampler
        tokens = image_tokens(latent_shape[-2], latent_shape[-1]) if latent_shape is not None else None
        return build_sampler(self.cfg.timestep_sampling, self.sampler_params, step, self.max_train_steps, tokens)

    def bin_probabilities(self, step: int = 0, latent_shape: tuple[int, ...] | None = None) -> Tensor:
        """P(bin) [T] of the sampler in effect (loss_map: the map's current mixed probabilities), fp64 CPU."""
        if self.cfg.timestep_sampling == "loss_map":
            return self._loss_map_probs()
        return bin_probabilities(self.sampler_at(step, latent_shape), self.bin_edges_u)

    def _loss_map_probs(self) -> Tensor:
        return self.loss_map.sampling_probs(self.base_bin_probs, self.cfg.loss_map_mix).double()

    def _uniforms(self, step: int, batch_size: int, micro_step: int) -> Tensor:
        """U for this rank's micro-batch: per-rank draws, then strata of the global batch, then the cluster slice."""
        U = rng.uniforms(self.seed, step, self.rank, batch_size, rng.STREAM_TIMESTEPS, micro_step=micro_step)
        if self.cfg.stratified_timesteps:
            # Global batch = all ranks × all micro-batches of the step, one shared permutation of its strata.
            n = self.world_size * self.grad_accum_steps * batch_size
            perm = torch.randperm(n, generator=rng.shared_generator(self.seed, step, rng.STREAM_STRATIFY))
            start = ((micro_step % self.grad_accum_steps) * self.world_size + self.rank) * batch_size
            U = stratified(U, perm[start:start + batch_size], n)
        cluster = self.cluster_for_step(step)
        if cluster is not None:
            U = cluster_slice(U, cluster, self.cfg.timestep_clusters)
        return U

    def sample_levels(self, step: int, batch_size: int, micro_step: int = 0, device=None,
                      latent_shape: tuple[int, ...] | None = None) -> NoiseLevels:
        """Noise levels of one micro-batch. ``latent_shape`` ([B, C, H, W]) is needed by flux_shift only."""
        U = self._uniforms(step, batch_size, micro_step)
        if self.cfg.timestep_sampling == "loss_map":
            probs = self._loss_map_probs()
            bins = self.loss_map.sample_bins(U, probs)
            # A uniform position inside the bin's u-interval, from its own stream.
            V = rng.uniforms(self.seed, step, self.rank, batch_size, rng.STREAM_WITHIN_BIN, micro_step=micro_step)
            low, high = self.bin_edges_u[bins], self.bin_edges_u[bins + 1]
            u = low + V * (high - low)
        else:
            if self.cfg.timestep_sampling in IMAGE_DEPENDENT and latent_shape is None:
                raise ValueError(f"--timestep_sampling {self.cfg.timestep_sampling} needs the latent size: "
                                 "pass latent_shape=latents.shape to sample_levels")
            u = self.sampler_at(step, latent_shape).icdf(U)
        levels = self.levels_from_u(u)
        if self.cfg.loss_map_unbiased and self.cfg.timestep_sampling == "loss_map":
            levels.sample_weight = LossMap.importance_weights(levels.bins, probs, self.base_bin_probs).float()
        levels.step, levels.micro_step = step, micro_step
        return self.to_device(levels, device)

    def levels_from_u(self, u: Tensor) -> NoiseLevels:
        """Map noise fractions u (fp64, CPU) to the family's levels (§0)."""
        if self.kind == "ddpm":
            t = self.schedule.timesteps_from_u(u, self.range)
            timesteps, bins, snr, sigma = t, t, self.schedule.snr(t).float(), None
        else:
            sigma64 = self.schedule.sigmas_from_u(u, self.range)
            bins = self.schedule.bins(sigma64)
            timesteps, snr = self.schedule.timesteps(sigma64).float(), self.schedule.snr(sigma64).float()
            sigma = sigma64.float()
        return NoiseLevels(u=u.float().clamp(0.0, U_MAX_FP32), timesteps=timesteps, bins=bins, snr=snr, sigma=sigma,
                           sample_weight=torch.ones(u.shape[0]))

    def grid_levels(self) -> NoiseLevels:
        """One level per bin index i = 0..T−1, fp64 on the CPU (curves and tools): DDPM t = i; flow σ = (i + 1)/T."""
        T = self.num_bins
        index = torch.arange(T)
        u, ones = (index / T).double(), torch.ones(T, dtype=torch.float64)
        if self.kind == "ddpm":
            return NoiseLevels(u=u, timesteps=index, bins=index, snr=self.schedule.snr(index), sigma=None,
                               sample_weight=ones)
        sigma = (index + 1).double() / T
        return NoiseLevels(u=u, timesteps=self.schedule.timesteps(sigma), bins=self.schedule.bins(sigma),
                           snr=self.schedule.snr(sigma), sigma=sigma, sample_weight=ones)

    @staticmethod
    def to_device(levels: NoiseLevels, device) -> NoiseLevels:
        if device is None:
            return levels
        move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return NoiseLevels(u=move(levels.u), timesteps=move(levels.timesteps), bins=move(levels.bins),
                           snr=move(levels.snr), sigma=move(levels.sigma), sample_weight=move(levels.sample_weight),
                           step=levels.step, micro_step=levels.micro_step)

    # ------------------------------------------------------------------------------------------ noise, inputs
    def sample_noise(self, latents: Tensor, step: int, micro_step: int = 0) -> Tensor:
        """ε ~ N(0, 1) like ``latents`` (+ --noise_offset / --multires_noise_iterations), from this rank's
        "noise" stream on the latents' device."""
        cfg = self.cfg
        generator = rng.generator_for(self.seed, step, self.rank, rng.STREAM_NOISE, latents.device, micro_step)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
        if cfg.noise_offset:
            noise = noise + offset_noise(latents, generator, cfg.noise_offset, cfg.adaptive_noise_scale,
                                         cfg.noise_offset_random_strength).float()
        if cfg.multires_noise_iterations:
            noise = multires_noise(noise, generator, cfg.multires_noise_iterations, cfg.multires_noise_discount)
        return noise.to(latents.dtype)

    def make_inputs(self, latents: Tensor, noise: Tensor, levels: NoiseLevels) -> tuple[Tensor, Tensor]:
        """(noisy input, target) for the prediction type (library/objective.py); with --ip_noise_gamma the noisy
        input is built from a perturbed ε while the target keeps ε. Computed in fp32; noisy in the latents' dtype."""
        x0, eps = latents.float(), noise.float()
        eps_in = eps
        if self.cfg.ip_noise_gamma:
            generator = rng.generator_for(self.seed, levels.step, self.rank, rng.STREAM_IP_NOISE, latents.device,
                                          levels.micro_step)
            eps_in = input_perturbation(eps, generator, self.cfg.ip_noise_gamma,
                                        self.cfg.ip_noise_gamma_random_strength)
        if self.kind == "ddpm":
            alpha_bar = self.schedule.alpha_bar(levels.timesteps).to(x0)
            noisy = ddpm_noisy(x0, eps_in, alpha_bar)
            target = eps if self.prediction_type == "epsilon" else v_target(x0, eps, alpha_bar)
        else:
            noisy = flow_noisy(x0, eps_in, levels.sigma.to(x0))
            target = flow_velocity_target(x0, eps) if self.prediction_type == "flow" else x0
        return noisy.to(latents.dtype), target

    # ------------------------------------------------------------------------------------------ loss
    def huber_threshold(self, levels: NoiseLevels) -> Tensor:
        """Per-sample Huber threshold c [B] (--huber_schedule, --huber_c, --huber_scale), on the levels' device."""
        cfg = self.cfg
        return huber_threshold(cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, levels.timesteps.to(levels.snr),
                               levels.snr)

    def timestep_weights(self, levels: NoiseLevels, step: int, map_values: Tensor | None = None) -> Tensor:
        """The product of the enabled §4 timestep weights [B] (dtype of levels.snr); ``map_values`` replaces the
        loss map's values (e.g. a flat map for curves)."""
        fraction = self.noise_fraction(levels)
        values = map_values if map_values is not None else self.loss_map.values if self.loss_map is not None else None
        return timestep_weights(self.weight_options, levels.snr, levels.sigma, fraction, levels.bins, step,
                                self.max_train_steps, values, self.trained_bins)

    def noise_fraction(self, levels: NoiseLevels) -> Tensor:
        """t/T (DDPM) or σ (flow), dtype of levels.snr: the noise axis of the curve offset and the learned u."""
        return levels.sigma if levels.sigma is not None else levels.timesteps.to(levels.snr) / self.num_bins

    def _signal_fraction(self, levels: NoiseLevels) -> Tensor:
        """ᾱ = SNR/(1 + SNR) (DDPM: read from the table)."""
        if self.kind == "ddpm":
            return self.schedule.alpha_bar(levels.timesteps).float()
        return levels.snr / (1 + levels.snr)

    def elementwise(self, pred: Tensor, target: Tensor, levels: NoiseLevels, mask: Tensor | None = None,
                    step: int = 0) -> Tensor:
        """The elementwise loss of --loss_type (fp32, prediction already in the target's space); ``mask`` at the
        loss's size (``mask_like``); ``step`` drives the ew schedule."""
        cfg = self.cfg
        if cfg.loss_type in THRESHOLD_LOSS_TYPES:
            return elementwise_loss(pred, target, cfg.loss_type, self.huber_threshold(levels))
        if cfg.loss_type == "combined":
            return combined_loss(pred, target, cfg.loss_weights, cfg.cosine_dim, mask)
        if cfg.loss_type == "ew":
            blend = ew_blend(self.loss_map.values, levels.bins, step, self.max_train_steps, self.trained_bins)
            return ew_loss(pred, target, self._signal_fraction(levels), blend, cfg.ew_boundary_shift)
        if cfg.loss_type == "clustered_mse":
            if cfg.clustered_mse_mode == "kmeans":
                position = map_position(self.loss_map.values, levels.bins, self.trained_bins)
                return clustered_mse_kmeans(pred, target, kmeans_cluster_counts(position))
            return clustered_mse(pred, target)
        return elementwise_loss(pred, target, cfg.loss_type)

    def loss(self, model_pred: Tensor, target: Tensor, levels: NoiseLevels, step: int, *, noisy: Tensor | None = None,
             sample_weights: Tensor | None = None, mask: Tensor | None = None) -> LossResult:
        """Elementwise loss (fp32) -> mask -> per-sample mean -> weights -> plain batch mean (spec §0).

        Weights multiply the per-sample loss (never the residual) in the spec's order: ``sample_weights`` (the
        dataset weight, prior_loss_weight) · importance weight (--loss_map_unbiased) · §4 timestep weights; then
        --loss_weighting learned makes each sample L/exp(u(σ)) + u(σ). ``mask`` [B, 1, h, w] in [0, 1] (any
        size: area-resized to the loss's) multiplies the elementwise loss; --masked_loss_normalization area
        divides by the mask's area. ``noisy`` is needed for "flow_x0" (x̂0 = x_σ − σ·F)."""
        pred = prediction_to_loss_space(model_pred.float(), noisy, levels, self.prediction_type)
        if mask is not None:
            mask = mask_like(mask, pred)
        elementwise = self.elementwise(pred, target.float(), levels, mask, step)
        raw = per_sample_mean(elementwise, mask, renormalize=self.cfg.masked_loss_normalization == "area")
        weights = levels.sample_weight.to(raw)
        if sample_weights is not None:
            weights = sample_weights.to(raw) * weights
        weights = weights * self.timestep_weights(levels, step).to(raw)
        weighted = raw * weights
        if self.learned is None:
            return LossResult(loss=weighted.mean(), raw=raw, weighted=weighted)
        u = self.learned(self.noise_fraction(levels).to(raw.device)).to(raw)
        objective = learned_objective(weighted, u)
        return LossResult(loss=objective.mean(), raw=raw, weighted=(weighted * torch.exp(-u)).detach())

    # ------------------------------------------------------------------------------------------ loss map, state
    def record(self, result: LossResult, levels: NoiseLevels, gather: Callable[[Tensor], Tensor] | None = None) -> None:
        """Update the loss map (if any option uses one) with every rank's (bin, loss), in rank order, so all
        ranks keep identical maps. ``gather`` is accelerator.gather (None on one process)."""
        if self.loss_map is None:
            return
        losses = result.weighted if self.cfg.loss_map_record == "weighted" else result.raw
        gathered_update(self.loss_map, levels.bins, losses.detach().float(), gather)

    def state_dict(self) -> dict:
        """The loss map and the learned weighting (u and its Adam): the random streams are counter-based."""
        sd = {}
        if self.loss_map is not None:
            sd["loss_map"] = self.loss_map.state_dict()
        if self.learned is not None:
            sd["learned_weighting"] = self.learned.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore the loss map and the learned weighting. A state without them (saved by a run without them)
        leaves the map flat and u at its start."""
        if self.loss_map is not None and sd.get("loss_map") is not None:
            self.loss_map.load_state_dict(sd["loss_map"])
        if self.learned is not None and sd.get("learned_weighting") is not None:
            self.learned.load_state_dict(sd["learned_weighting"])

    def metadata(self) -> dict[str, str]:
        """``cfg.metadata()`` with the σ shift actually in use (flow)."""
        md = self.cfg.metadata()
        if self.kind == "flow":
            md["ss_timestep_shift"] = str(self.schedule.shift)
        return md
