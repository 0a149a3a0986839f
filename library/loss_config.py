"""The loss and timestep flags: one argparse group (KS names and defaults), one validated dataclass.

Spec: ../shared/spec/losses-and-timesteps.md. ``LossConfig.from_args`` validates every flag before any model
loads: ranges, options that do not apply to the family or prediction type, conflicting samplers, and options
that would be silently ignored (given with a non-default value while nothing uses them). Values equal to the
default are accepted even where unused, so KS config files, which list every default, still load.
Every mistake raises ``UserError("--flag: what is wrong; how to fix it")``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Any

from library import families
from library.errors import UserError, closest
from library.losses import (CLUSTERED_MSE_MODES, COMBINED_TERMS, COSINE_DIMS, DEFAULT_COMBINED_WEIGHTS,
                            HUBER_SCHEDULES, LOSS_TYPES, MASK_NORMALIZATIONS, THRESHOLD_LOSS_TYPES)
from library.schedules import NUM_TRAIN_TIMESTEPS
from library.timesteps import MODE_SCALE_RANGE, SAMPLER_NAMES, SamplerParams
from library.weighting import SNR_WEIGHTINGS, WeightOptions

PREDICTION_TYPES = {"ddpm": ("epsilon", "v_prediction"), "flow": ("flow", "flow_x0")}
TIMESTEP_SAMPLINGS = SAMPLER_NAMES + ("loss_map",)
# KS Flux `--timestep_sampling sigma` (its default there): the --weighting_scheme sampler with σ shifted by
# --discrete_flow_shift (KS draws from FlowMatchEulerDiscreteScheduler(shift=discrete_flow_shift)). Resolved to
# that sampler plus --timestep_shift in from_args.
KS_SIGMA_SAMPLING = "sigma"
# KS SD3 --weighting_scheme: two select a sampler, two a loss weight, two nothing.
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
SCHEME_SAMPLERS = ("logit_normal", "mode")
SCHEME_WEIGHTS = ("sigma_sqrt", "cosmap")
LOSS_MAP_RECORDS = ("raw", "weighted")
CLUSTER_LR_SCHEDULES = ("global", "per_cluster")
EXPERIMENTAL_LOSS_TYPES = ("ew", "clustered_mse")
LOSS_WEIGHTINGS = ("none", "learned")


def parse_loss_weights(text: str | dict | None) -> dict[str, float]:
    """``--loss_weights mse=0.4,l1=0.4,cosine=0.2`` -> {"mse": 0.4, "l1": 0.4, "cosine": 0.2}. Missing terms
    are 0 when any term is given; None gives the defaults."""
    if text is None:
        return dict(DEFAULT_COMBINED_WEIGHTS)
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            if "=" not in part:
                raise UserError(f"--loss_weights: '{part}' is not term=weight; write e.g. mse=0.4,l1=0.4,cosine=0.2")
            key, value = part.split("=", 1)
            items.append((key, value))
    weights = {term: 0.0 for term in COMBINED_TERMS}
    for key, value in items:
        if key not in COMBINED_TERMS:
            hint = closest(key, COMBINED_TERMS)
            raise UserError(f"--loss_weights: unknown term '{key}'"
                            + (f"; did you mean '{hint}'?" if hint else f"; terms are {', '.join(COMBINED_TERMS)}"))
        try:
            weights[key] = float(value)
        except ValueError:
            raise UserError(f"--loss_weights: weight of '{key}' is '{value}'; give a number") from None
        if not math.isfinite(weights[key]) or weights[key] < 0:
            raise UserError(f"--loss_weights: weight of '{key}' is {value}; give a finite number >= 0")
    if sum(weights.values()) <= 0:
        raise UserError("--loss_weights: all weights are 0; give at least one positive term, e.g. mse=1")
    return weights


def format_loss_weights(weights: dict[str, float]) -> str:
    return ",".join(f"{k}={weights[k]:g}" for k in COMBINED_TERMS)


_SAMPLER_DEFAULTS = SamplerParams()


@dataclass
class LossConfig:
    """Every loss / timestep flag, resolved. Build it with ``from_args`` (validated); direct construction is
    for tests and tools and is not validated."""

    family: str = "sd1"
    prediction_type: str = "epsilon"
    # loss (§1, §2)
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_COMBINED_WEIGHTS))
    cosine_dim: str = "spatial"
    ew_boundary_shift: float = 0.0
    clustered_mse_mode: str = "quantile"
    masked_loss: bool = False
    masked_loss_normalization: str = "area"
    # weights (§4)
    min_snr_gamma: float | None = None
    snr_weighting: str | None = None
    max_snr_gamma: float = 1.0
    loss_weighting: str = "none"
    loss_weighting_lr: float = 0.005
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    weighting_scheme: str = "uniform"
    loss_curve_offset: float | None = None
    loss_curve_offset_schedule: float = 0.0
    loss_map_offset: bool = False
    # timesteps (§0, §3); timestep_sampling is the sampler in effect (after --weighting_scheme)
    timestep_sampling: str = "uniform"
    # the sampler flags take their defaults from the samplers' own parameter object (one source of truth)
    logit_mean: float = _SAMPLER_DEFAULTS.logit_mean
    logit_std: float = _SAMPLER_DEFAULTS.logit_std
    mode_scale: float = _SAMPLER_DEFAULTS.mode_scale
    sigmoid_scale: float = _SAMPLER_DEFAULTS.sigmoid_scale
    discrete_flow_shift: float = _SAMPLER_DEFAULTS.discrete_flow_shift
    beta_alpha: float | None = _SAMPLER_DEFAULTS.beta_alpha
    beta_beta: float | None = _SAMPLER_DEFAULTS.beta_beta
    logit_mean_end: float = _SAMPLER_DEFAULTS.logit_mean_end
    dynamic_fraction: float = _SAMPLER_DEFAULTS.dynamic_fraction
    min_timestep: int = 0
    max_timestep: int = NUM_TRAIN_TIMESTEPS
    timestep_shift: float = 1.0
    stratified_timesteps: bool = False
    zero_terminal_snr: bool = False
    # loss map (§5) and clusters (§6)
    loss_map_mix: float = 0.1
    loss_map_unbiased: bool = False
    loss_map_update_rate: float = 0.5
    loss_map_record: str = "raw"
    loss_map_init: str | None = None
    timestep_clusters: int = 0
    cluster_lr_schedule: str = "global"
    # noise extras (KS)
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False

    # ------------------------------------------------------------------------------------------ derived
    @property
    def family_kind(self) -> str:
        return families.kind_of(self.family)

    @property
    def loss_map_base_sampling(self) -> str:
        """The sampler the loss map mixes with (``--loss_map_mix``): the one --weighting_scheme selects, else
        uniform."""
        return self.weighting_scheme if self.weighting_scheme in SCHEME_SAMPLERS else "uniform"

    @property
    def needs_loss_map(self) -> bool:
        return (self.timestep_sampling == "loss_map" or self.loss_map_offset or self.loss_type == "ew"
                or (self.loss_type == "clustered_mse" and self.clustered_mse_mode == "kmeans"))

    def sampler_params(self) -> SamplerParams:
        """The sampler flags as the samplers' own parameter object (same names)."""
        return SamplerParams(**{f.name: getattr(self, f.name) for f in fields(SamplerParams)})

    def weight_options(self) -> WeightOptions:
        return WeightOptions(
            prediction_type=self.prediction_type, weighting_scheme=self.weighting_scheme,
            min_snr_gamma=self.min_snr_gamma, snr_weighting=self.snr_weighting, max_snr_gamma=self.max_snr_gamma,
            scale_v_pred_loss_like_noise_pred=self.scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss=self.v_pred_like_loss, debiased_estimation_loss=self.debiased_estimation_loss,
            loss_curve_offset=self.loss_curve_offset, loss_curve_offset_schedule=self.loss_curve_offset_schedule,
            loss_map_offset=self.loss_map_offset)

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def from_args(cls, args: argparse.Namespace, family: str, prediction_type: str) -> "LossConfig":
        """Read and validate the flags of ``add_arguments`` (plus --zero_terminal_snr, --precondition_outputs and
        --v_parameterization from the model group, if present) for a family ("sd1" | "sd2" | "sdxl" are DDPM,
        "sd3" is flow) and its prediction type ("epsilon" | "v_prediction" | "flow" | "flow_x0")."""
        kind = families.get_family(family).kind   # ValueError for an unknown family
        if getattr(args, "precondition_outputs", False):
            if kind != "flow":
                raise UserError(f"--precondition_outputs: applies to SD3 (flow matching) only, not {family}; remove it")
            prediction_type = "flow_x0"
        if prediction_type not in PREDICTION_TYPES[kind]:
            raise ValueError(f"prediction type '{prediction_type}' is not one of {family}'s {PREDICTION_TYPES[kind]}")
        if kind == "flow" and getattr(args, "v_parameterization", False):
            raise UserError("--v_parameterization: SD3 is trained with flow matching (velocity target); remove it")
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        given.pop("family", None)
        given.pop("prediction_type", None)
        if given.get("min_snr_gamma") == 0:  # KS treats 0 as off (`if args.min_snr_gamma:`)
            given["min_snr_gamma"] = None
        values = {k: v for k, v in given.items() if v is not None}
        if values.get("timestep_sampling") == KS_SIGMA_SAMPLING:
            _resolve_ks_sigma(values, given)
        values["loss_weights"] = parse_loss_weights(given.get("loss_weights"))
        cfg = cls(family=family, prediction_type=prediction_type, **values)
        cfg.timestep_sampling = _resolve_sampling(cfg.timestep_sampling, cfg.weighting_scheme)
        _check_unused(given, cfg)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Ranges and family / prediction-type rules on resolved values (raises UserError)."""
        kind, pred = self.family_kind, self.prediction_type
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("huber_schedule", self.huber_schedule, HUBER_SCHEDULES)
        _choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        _choice("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        _choice("cosine_dim", self.cosine_dim, COSINE_DIMS)
        _choice("loss_map_record", self.loss_map_record, LOSS_MAP_RECORDS)
        _choice("cluster_lr_schedule", self.cluster_lr_schedule, CLUSTER_LR_SCHEDULES)
        _choice("clustered_mse_mode", self.clustered_mse_mode, CLUSTERED_MSE_MODES)
        _choice("masked_loss_normalization", self.masked_loss_normalization, MASK_NORMALIZATIONS)
        _choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        if self.snr_weighting is not None:
            _choice("snr_weighting", self.snr_weighting, SNR_WEIGHTINGS)
            if self.min_snr_gamma:
                raise UserError(f"--snr_weighting {self.snr_weighting} and --min_snr_gamma: both set the SNR weight "
                                "(x0-space); keep one")
        _positive("max_snr_gamma", self.max_snr_gamma)
        _positive("loss_weighting_lr", self.loss_weighting_lr)
        if self.loss_map_init is not None:
            import os
            if not os.path.isfile(self.loss_map_init):
                raise UserError(f"--loss_map_init: {self.loss_map_init} does not exist; give a loss_map.safetensors "
                                "or loss_map.csv written by an earlier run")
            if not self.needs_loss_map:
                raise UserError("--loss_map_init: has no effect without a loss map (--timestep_sampling loss_map, "
                                "--loss_map_offset, --loss_type ew or --clustered_mse_mode kmeans); remove it")
            from library.loss_map import LossMap
            LossMap(NUM_TRAIN_TIMESTEPS).load_any(self.loss_map_init, "--loss_map_init")  # a bad file fails here
        _positive("huber_c", self.huber_c)
        _positive("huber_scale", self.huber_scale)
        _positive("logit_std", self.logit_std)
        _positive("sigmoid_scale", self.sigmoid_scale)
        _positive("discrete_flow_shift", self.discrete_flow_shift)
        _positive("timestep_shift", self.timestep_shift)
        if self.min_snr_gamma is not None:
            _positive("min_snr_gamma", self.min_snr_gamma)
        if self.v_pred_like_loss is not None and self.v_pred_like_loss < 0:
            raise UserError(f"--v_pred_like_loss: {self.v_pred_like_loss} is negative; "
                            "give a weight >= 0 (0.1-0.5 are typical)")
        low, high = MODE_SCALE_RANGE
        if not low <= self.mode_scale <= high:
            raise UserError(f"--mode_scale: {self.mode_scale} is outside [{low}, {high:.4f}], where the mode sampler "
                            f"is a valid (monotone) inverse CDF; the SD3 default is 1.29")
        if not 0 < self.dynamic_fraction <= 1:
            raise UserError(f"--dynamic_fraction: {self.dynamic_fraction} is outside (0, 1]; 0.8 is the default")
        if self.timestep_sampling == "beta":
            if self.beta_alpha is None or self.beta_beta is None:
                raise UserError("--timestep_sampling beta: needs the shape of the Beta distribution; give both "
                                "--beta_alpha and --beta_beta (e.g. 2 and 2)")
            _positive("beta_alpha", self.beta_alpha)
            _positive("beta_beta", self.beta_beta)
        if not 0 <= self.min_timestep < NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--min_timestep: {self.min_timestep} is outside [0, {NUM_TRAIN_TIMESTEPS - 1}]; "
                            "the default is 0")
        if not 0 < self.max_timestep <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--max_timestep: {self.max_timestep} is outside [1, {NUM_TRAIN_TIMESTEPS}]; "
                            f"the default is {NUM_TRAIN_TIMESTEPS}")
        if self.min_timestep >= self.max_timestep:
            raise UserError(f"--min_timestep {self.min_timestep} must be below --max_timestep {self.max_timestep}; "
                            "lower --min_timestep or raise --max_timestep")
        if not 0 <= self.loss_map_mix <= 1:
            raise UserError(f"--loss_map_mix: {self.loss_map_mix} is outside [0, 1]; 0.1 is the default")
        if self.loss_map_unbiased and self.loss_map_mix <= 0:
            raise UserError("--loss_map_unbiased: needs --loss_map_mix > 0, or bins the map never visits get "
                            "infinite importance weights; use the default 0.1")
        if not 0 < self.loss_map_update_rate <= 1:
            raise UserError(f"--loss_map_update_rate: {self.loss_map_update_rate} is outside (0, 1]; "
                            "0.5 is the default")
        if self.timestep_clusters < 0:
            raise UserError(f"--timestep_clusters: {self.timestep_clusters} is negative; 0 turns it off, 10 is typical")
        if self.timestep_clusters > NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--timestep_clusters: {self.timestep_clusters} is more than the {NUM_TRAIN_TIMESTEPS} "
                            "timesteps; 10 is typical")
        for name in ("loss_curve_offset", "loss_curve_offset_schedule"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UserError(f"--{name}: {value} is not a finite number; give a number in [-1, 1]")
        start = self.loss_curve_offset or 0.0
        end = start + self.loss_curve_offset_schedule
        if max(abs(start), abs(end)) > 1:
            raise UserError(f"--loss_curve_offset / --loss_curve_offset_schedule: the offset c runs from {start:g} to "
                            f"{end:g}; |c| > 1 makes some weights negative; keep |c| <= 1")
        if self.noise_offset is not None and self.noise_offset < 0:
            raise UserError(f"--noise_offset: {self.noise_offset} is negative; 0.0357-0.1 are typical")
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 1:
            raise UserError(f"--multires_noise_iterations: {self.multires_noise_iterations} is below 1; "
                            "6-10 are typical")
        if not 0 < self.multires_noise_discount <= 1:
            raise UserError(f"--multires_noise_discount: {self.multires_noise_discount} is outside (0, 1]; "
                            "0.3 is the default")
        if self.ip_noise_gamma is not None and self.ip_noise_gamma < 0:
            raise UserError(f"--ip_noise_gamma: {self.ip_noise_gamma} is negative; 0.1 is typical")
        if self.noise_offset is not None and self.multires_noise_iterations is not None:
            raise UserError("--noise_offset and --multires_noise_iterations: cannot be used together (KS rule); "
                            "keep one")
        # family and prediction type
        if kind == "ddpm":
            if self.weighting_scheme not in ("uniform", "none"):
                fix = (f"use --timestep_sampling {self.weighting_scheme}" if self.weighting_scheme in SCHEME_SAMPLERS
                       else "remove it (for DDPM, --min_snr_gamma or --debiased_estimation_loss weight timesteps)")
                raise UserError(f"--weighting_scheme {self.weighting_scheme}: is an SD3 (flow) option, not for "
                                f"{self.family}; {fix}")
            if self.timestep_shift != 1.0:
                raise UserError(f"--timestep_shift: shifts flow σ (SD3) and does not apply to {self.family}; "
                                "use --timestep_sampling shift --discrete_flow_shift S to shift DDPM timesteps")
        else:
            if self.zero_terminal_snr:
                raise UserError("--zero_terminal_snr: rescales DDPM schedules; flow matching (SD3) already reaches "
                                "pure noise at σ = 1; remove it")
        if self.scale_v_pred_loss_like_noise_pred and pred != "v_prediction":
            raise UserError("--scale_v_pred_loss_like_noise_pred: applies to v-prediction only (KS rule); "
                            + ("add --v_parameterization or remove it" if kind == "ddpm" else "remove it"))
        if self.v_pred_like_loss and pred != "epsilon":
            raise UserError("--v_pred_like_loss: applies to ε-prediction only (KS rule); "
                            + ("remove it or --v_parameterization" if kind == "ddpm" else "remove it"))
        if self.timestep_sampling in ("shift", "flux_shift") and self.timestep_shift != 1.0:
            raise UserError(f"--timestep_shift with --timestep_sampling {self.timestep_sampling}: both shift the noise "
                            "level, so it would be shifted twice; keep one")

    # ------------------------------------------------------------------------------------------ metadata
    def metadata(self) -> dict[str, str]:
        """KS-style ``ss_*`` metadata of every loss and timestep option that is in effect (values as str)."""
        md: dict[str, Any] = {
            "ss_loss_type": self.loss_type,
            "ss_huber_schedule": self.huber_schedule,
            "ss_huber_c": self.huber_c,
            "ss_huber_scale": self.huber_scale,
            "ss_min_snr_gamma": self.min_snr_gamma,
            "ss_snr_weighting": self.snr_weighting,
            "ss_loss_weighting": self.loss_weighting,
            "ss_masked_loss": self.masked_loss,
            "ss_debiased_estimation": self.debiased_estimation_loss,
            "ss_scale_v_pred_loss_like_noise_pred": self.scale_v_pred_loss_like_noise_pred,
            "ss_v_pred_like_loss": self.v_pred_like_loss,
            "ss_prediction_type": self.prediction_type,
            "ss_timestep_sampling": self.timestep_sampling,
            "ss_weighting_scheme": self.weighting_scheme,
            "ss_min_timestep": self.min_timestep,
            "ss_max_timestep": self.max_timestep,
            "ss_stratified_timesteps": self.stratified_timesteps,
            "ss_noise_offset": self.noise_offset,
            "ss_noise_offset_random_strength": self.noise_offset_random_strength,
            "ss_adaptive_noise_scale": self.adaptive_noise_scale,
            "ss_multires_noise_iterations": self.multires_noise_iterations,
            "ss_multires_noise_discount": self.multires_noise_discount,
            "ss_ip_noise_gamma": self.ip_noise_gamma,
            "ss_ip_noise_gamma_random_strength": self.ip_noise_gamma_random_strength,
            "ss_loss_curve_offset": self.loss_curve_offset,
            "ss_loss_curve_offset_schedule": self.loss_curve_offset_schedule,
            "ss_loss_map_offset": self.loss_map_offset,
            "ss_timestep_clusters": self.timestep_clusters,
        }
        if self.family_kind == "flow":
            md["ss_timestep_shift"] = self.timestep_shift
        for name in _SAMPLER_PARAMETERS.get(self.timestep_sampling, ()):
            md[f"ss_{name}"] = getattr(self, name)
        if self.weighting_scheme == "mode" or self.timestep_sampling == "mode":
            md["ss_mode_scale"] = self.mode_scale
        if self.timestep_sampling == "loss_map":
            md.update({"ss_loss_map_mix": self.loss_map_mix, "ss_loss_map_unbiased": self.loss_map_unbiased,
                       "ss_loss_map_base_sampling": self.loss_map_base_sampling})
            md.update({f"ss_{n}": getattr(self, n) for n in _SAMPLER_PARAMETERS.get(self.loss_map_base_sampling, ())})
        if self.needs_loss_map:
            md.update({"ss_loss_map_update_rate": self.loss_map_update_rate,
                       "ss_loss_map_record": self.loss_map_record})
        if self.loss_type == "combined":
            md.update({"ss_loss_weights": format_loss_weights(self.loss_weights), "ss_cosine_dim": self.cosine_dim})
        if self.loss_type == "ew":
            md["ss_ew_boundary_shift"] = self.ew_boundary_shift
        if self.loss_type == "clustered_mse":
            md["ss_clustered_mse_mode"] = self.clustered_mse_mode
        if self.snr_weighting == "max_snr":
            md["ss_max_snr_gamma"] = self.max_snr_gamma
        if self.loss_weighting == "learned":
            md["ss_loss_weighting_lr"] = self.loss_weighting_lr
        if self.masked_loss:
            md["ss_masked_loss_normalization"] = self.masked_loss_normalization
        if self.timestep_clusters:
            md["ss_cluster_lr_schedule"] = self.cluster_lr_schedule
        return {k: str(v) for k, v in md.items()}  # KS writes str(None) = "None" for unset options


# Which flags each sampler reads (the rest are unused by it).
_SAMPLER_PARAMETERS: dict[str, tuple[str, ...]] = {
    "logit_normal": ("logit_mean", "logit_std"),
    "sigmoid": ("sigmoid_scale",),
    "mode": ("mode_scale",),
    "beta": ("beta_alpha", "beta_beta"),
    "shift": ("sigmoid_scale", "discrete_flow_shift"),
    "flux_shift": ("sigmoid_scale",),
    "logit_normal_dynamic": ("logit_mean", "logit_std", "logit_mean_end", "dynamic_fraction"),
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = closest(str(value), choices)
        raise UserError(f"--{name}: unknown value '{value}'; " + (f"did you mean '{hint}'?" if hint else
                                                                 f"choose one of {', '.join(choices)}"))


def _positive(name: str, value: float) -> None:
    if value is None or not math.isfinite(value) or value <= 0:
        default = _DEFAULTS.get(name)
        hint = f"the default is {default}" if default is not None else "e.g. 2"
        raise UserError(f"--{name}: {value} is not a finite number > 0; give a positive number ({hint})")


def _resolve_sampling(sampling: str, scheme: str) -> str:
    """KS SD3 compatibility: --weighting_scheme logit_normal | mode selects that sampler; a different explicit
    --timestep_sampling is a conflict (loss_map may use the scheme as its base sampler)."""
    if scheme not in SCHEME_SAMPLERS:
        return sampling
    if sampling in ("uniform", scheme):
        return scheme
    if sampling == "loss_map":
        return sampling
    raise UserError(f"--weighting_scheme {scheme} selects the {scheme} timestep sampler, which conflicts with "
                    f"--timestep_sampling {sampling}; keep one of them")


def _resolve_ks_sigma(values: dict, given: dict) -> None:
    """`--timestep_sampling sigma` -> uniform (then --weighting_scheme's sampler) with timestep_shift =
    discrete_flow_shift; the shift flag is then used, so it is dropped from the unused-flag check."""
    if values.get("timestep_shift", 1.0) != 1.0:
        raise UserError("--timestep_shift with --timestep_sampling sigma: sigma already shifts σ by "
                        "--discrete_flow_shift; keep one of them")
    values["timestep_sampling"] = "uniform"
    values["timestep_shift"] = values.get("discrete_flow_shift", _DEFAULTS["discrete_flow_shift"])
    given.pop("discrete_flow_shift", None)


def _differs(given: dict, name: str) -> bool:
    """Whether a flag holds something other than its default (None counts as the default)."""
    value = given.get(name)
    if value is None:
        return False
    if name == "loss_weights":
        return parse_loss_weights(value) != DEFAULT_COMBINED_WEIGHTS
    return value != _DEFAULTS[name]


def _check_unused(given: dict, cfg: LossConfig) -> None:
    """Reject flags given with a non-default value that nothing in ``cfg`` would read (silent ignores are bugs,
    §0). ``given`` holds the raw flag values, ``cfg`` the resolved configuration."""
    def reject(name: str, why: str) -> None:
        if _differs(given, name):
            raise UserError(f"--{name}: has no effect {why}; remove it")

    sampling, loss_type = cfg.timestep_sampling, cfg.loss_type
    used = set(_SAMPLER_PARAMETERS.get(sampling, ()))
    if sampling == "loss_map":
        used |= set(_SAMPLER_PARAMETERS.get(cfg.loss_map_base_sampling, ()))
    for name in sorted({n for params in _SAMPLER_PARAMETERS.values() for n in params} - used):
        reject(name, f"with --timestep_sampling {sampling}"
                     + (f" (it is read by --timestep_sampling {_reader(name)})" if _reader(name) else ""))
    if loss_type not in THRESHOLD_LOSS_TYPES:
        for name in ("huber_c", "huber_scale", "huber_schedule"):
            reject(name, f"with --loss_type {loss_type} (only huber and smooth_l1 use it)")
    if loss_type != "combined":
        for name in ("loss_weights", "cosine_dim"):
            reject(name, f"with --loss_type {loss_type} (only combined uses it)")
    if loss_type != "ew":
        reject("ew_boundary_shift", f"with --loss_type {loss_type} (only ew uses it)")
    if loss_type != "clustered_mse":
        reject("clustered_mse_mode", f"with --loss_type {loss_type} (only clustered_mse uses it)")
    if cfg.snr_weighting != "max_snr":
        reject("max_snr_gamma", "without --snr_weighting max_snr")
    if cfg.loss_weighting != "learned":
        reject("loss_weighting_lr", "without --loss_weighting learned")
    if sampling != "loss_map":
        for name in ("loss_map_mix", "loss_map_unbiased"):
            reject(name, "without --timestep_sampling loss_map")
    if not cfg.needs_loss_map:
        for name in ("loss_map_update_rate", "loss_map_record"):
            reject(name, "without a loss map (--timestep_sampling loss_map, --loss_map_offset, --loss_type ew or "
                         "--clustered_mse_mode kmeans)")
    if not cfg.timestep_clusters:
        reject("cluster_lr_schedule", "without --timestep_clusters K")
    if not cfg.noise_offset:
        reject("noise_offset_random_strength", "without --noise_offset")
        if cfg.adaptive_noise_scale is not None:
            raise UserError("--adaptive_noise_scale: needs --noise_offset (KS rule); add --noise_offset or remove it")
    if cfg.multires_noise_iterations is None:
        reject("multires_noise_discount", "without --multires_noise_iterations")
    if not cfg.ip_noise_gamma:
        reject("ip_noise_gamma_random_strength", "without --ip_noise_gamma")


def _reader(name: str) -> str:
    return " or ".join(s for s, params in _SAMPLER_PARAMETERS.items() if name in params)


_DEFAULTS = {f.name: (f.default_factory() if callable(f.default_factory) else f.default) for f in fields(LossConfig)}


# ------------------------------------------------------------------------------------------------------------
# argparse
# ------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The loss / timestep flag group (KS names and defaults). Not here: --v_parameterization,
    --zero_terminal_snr, --v2, --seed, --precondition_outputs (model / training groups)."""
    d = _DEFAULTS
    g = parser.add_argument_group("loss and timesteps", "see docs/losses-and-timesteps.md")
    g.add_argument("--loss_type", type=str, default=d["loss_type"], choices=LOSS_TYPES,
                   help="elementwise loss: l2, l1, huber, smooth_l1, combined; ew and clustered_mse are "
                        "(experimental) (default l2)")
    g.add_argument("--huber_schedule", type=str, default=d["huber_schedule"], choices=HUBER_SCHEDULES,
                   help="Huber threshold over timesteps (default snr)")
    g.add_argument("--huber_c", type=float, default=d["huber_c"], help="Huber threshold c0 > 0 (default 0.1)")
    g.add_argument("--huber_scale", type=float, default=d["huber_scale"],
                   help="multiplies the Huber threshold of every schedule (default 1.0)")
    g.add_argument("--loss_weights", type=str, default=None,
                   help="combined loss terms (default mse=0.4,l1=0.4,cosine=0.2)")
    g.add_argument("--cosine_dim", type=str, default=d["cosine_dim"], choices=COSINE_DIMS,
                   help="combined loss cosine: per (sample, channel) over H·W (spatial, default), per position over "
                        "channels (channel), or per sample (flat)")
    g.add_argument("--ew_boundary_shift", type=float, default=d["ew_boundary_shift"],
                   help="(experimental) ew loss: shift of the boundary mean(|d|) (default 0)")
    g.add_argument("--clustered_mse_mode", type=str, default=d["clustered_mse_mode"], choices=CLUSTERED_MSE_MODES,
                   help="(experimental) clustered_mse: 8 quantile bins per sample (quantile, default), or 1-D k-means "
                        "with 4-100 clusters driven by the loss map (kmeans, the source's mode)")
    g.add_argument("--masked_loss", action="store_true",
                   help="multiply the loss by a mask: the image of the same name in the subset's "
                        "conditioning_data_dir (its red channel), or the alpha channel with --alpha_mask (KS)")
    g.add_argument("--masked_loss_normalization", type=str, default=d["masked_loss_normalization"],
                   choices=MASK_NORMALIZATIONS,
                   help="masked loss: divide by the mask area, the mean over the masked pixels (area, default), or "
                        "by all pixels as KS does (none)")
    g.add_argument("--snr_weighting", type=str, default=None, choices=SNR_WEIGHTINGS,
                   help="SNR weight in x0-space: snr (w = SNR, plain ε-MSE) or max_snr (w = max(SNR, γ))")
    g.add_argument("--max_snr_gamma", type=float, default=d["max_snr_gamma"],
                   help="--snr_weighting max_snr: γ (default 1, Salimans & Ho's truncated SNR)")
    g.add_argument("--loss_weighting", type=str, default=d["loss_weighting"], choices=LOSS_WEIGHTINGS,
                   help="learned: a per-noise-level log-variance u(σ) trained with the LoRA, loss = L/exp(u) + u "
                        "(EDM2, Karras et al. 2024) (default none)")
    g.add_argument("--loss_weighting_lr", type=float, default=d["loss_weighting_lr"],
                   help="--loss_weighting learned: Adam learning rate of u(σ) (default 0.005)")
    g.add_argument("--min_snr_gamma", "--snr_gamma", dest="min_snr_gamma", type=float, default=None,
                   help="Min-SNR weighting γ (5 is typical; --snr_gamma is an alias)")
    g.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation weighting")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="v-prediction only: scale the loss like ε-prediction (SNR/(SNR+1))")
    g.add_argument("--v_pred_like_loss", type=float, default=None,
                   help="ε-prediction only: add λ × the loss on the v scale")
    g.add_argument("--weighting_scheme", type=str, default=d["weighting_scheme"], choices=WEIGHTING_SCHEMES,
                   help="SD3 (KS): logit_normal / mode select that timestep sampler; sigma_sqrt / cosmap a loss "
                        "weight; uniform / none nothing (default uniform)")
    g.add_argument("--loss_curve_offset", type=float, default=None,
                   help="c: weight 1 - 2c(sigmoid(12t/T - 6) - 0.5); c > 0 raises low-noise loss")
    g.add_argument("--loss_curve_offset_schedule", type=float, default=d["loss_curve_offset_schedule"],
                   help="S: c grows by S over training (c = scale + S·step/total) (default 0)")
    g.add_argument("--loss_map_offset", action="store_true",
                   help="weight each sample by its bin's loss-map value / mean, fading out over training")
    g.add_argument("--timestep_sampling", type=str, default=d["timestep_sampling"],
                   choices=TIMESTEP_SAMPLINGS + (KS_SIGMA_SAMPLING,),
                   help="timestep sampler (default uniform); sigma (KS Flux): --weighting_scheme's sampler shifted "
                        "by --discrete_flow_shift")
    g.add_argument("--logit_mean", type=float, default=d["logit_mean"], help="logit_normal mean m (default 0)")
    g.add_argument("--logit_std", type=float, default=d["logit_std"], help="logit_normal std s (default 1)")
    g.add_argument("--mode_scale", type=float, default=d["mode_scale"], help="mode sampler scale (default 1.29)")
    g.add_argument("--sigmoid_scale", type=float, default=d["sigmoid_scale"],
                   help="sigmoid / shift / flux_shift: scale of the normal before the sigmoid (default 1)")
    g.add_argument("--discrete_flow_shift", type=float, default=d["discrete_flow_shift"],
                   help="shift sampler: shift s (default 3.0)")
    g.add_argument("--beta_alpha", type=float, default=None, help="beta sampler α")
    g.add_argument("--beta_beta", type=float, default=None, help="beta sampler β")
    g.add_argument("--logit_mean_end", type=float, default=d["logit_mean_end"],
                   help="logit_normal_dynamic: final mean (default 0.65)")
    g.add_argument("--dynamic_fraction", type=float, default=d["dynamic_fraction"],
                   help="logit_normal_dynamic: fraction of training over which the mean moves (default 0.8)")
    g.add_argument("--min_timestep", type=int, default=None, help="lowest timestep t_min (default 0)")
    g.add_argument("--max_timestep", type=int, default=None, help="timesteps stay below t_max (default 1000)")
    g.add_argument("--timestep_shift", "--training_shift", dest="timestep_shift", type=float, default=None,
                   help="SD3: shift σ by S(x) = s·x/(1 + (s−1)·x) (default 1 = none; 3.0 is usual at 1024²)")
    g.add_argument("--stratified_timesteps", action="store_true",
                   help="draw the global batch's timesteps from equal strata of [0, 1)")
    g.add_argument("--loss_map_mix", type=float, default=d["loss_map_mix"],
                   help="loss_map sampling: share λ of the base sampler (default 0.1)")
    g.add_argument("--loss_map_unbiased", action="store_true",
                   help="loss_map sampling: importance weights P_base/P keep the objective unbiased")
    g.add_argument("--loss_map_update_rate", type=float, default=d["loss_map_update_rate"],
                   help="loss map update rate r (default 0.5)")
    g.add_argument("--loss_map_record", type=str, default=d["loss_map_record"], choices=LOSS_MAP_RECORDS,
                   help="record the loss before (raw, default) or after (weighted) timestep weights")
    g.add_argument("--loss_map_init", type=str, default=None,
                   help="start the loss map from a file of an earlier run (loss_map.safetensors or loss_map.csv)")
    g.add_argument("--timestep_clusters", type=int, default=d["timestep_clusters"],
                   help="K timestep clusters with one optimizer state each (0 = off; 10 recommended)")
    g.add_argument("--cluster_lr_schedule", type=str, default=d["cluster_lr_schedule"], choices=CLUSTER_LR_SCHEDULES,
                   help="one LR schedule over global steps (global, default) or one per cluster")
    g.add_argument("--noise_offset", type=float, default=None, help="offset noise strength (0.0357 is typical)")
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="scale the noise offset by U(0, 1) per sample")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="add this × |mean latent| to the noise offset (needs --noise_offset)")
    g.add_argument("--multires_noise_iterations", type=int, default=None, help="pyramid noise levels (6-10)")
    g.add_argument("--multires_noise_discount", type=float, default=d["multires_noise_discount"],
                   help="pyramid noise discount per level (default 0.3)")
    g.add_argument("--ip_noise_gamma", type=float, default=None, help="input perturbation noise γ (0.1 is typical)")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="scale the input perturbation γ by U(0, 1) per sample")
