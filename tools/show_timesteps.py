"""Show what the loss / timestep flags of a training run mean, without a model.

    python tools/show_timesteps.py --model_family sd1 --timestep_sampling logit_normal --min_snr_gamma 5 \\
        --curves_out curves.csv --samples_out samples.csv --image_out timesteps.png
    python tools/show_timesteps.py --model_family sd3 --config_file run.toml --image_out timesteps.png

It takes the training flags (or a training ``--config_file``; keys this tool does not know are skipped) and
goes through the same code the trainer does (library/engine.py):

* ``--samples_out``: the timesteps a run draws (``--num_samples`` draws, ``--train_batch_size`` per step from
  ``--step`` on): step, u, timestep, bin, sigma, snr, sample_weight.
* ``--curves_out``: one row per bin index (1000 rows), header ``index,timestep,sigma,snr,loss_weight,huber_c``
  (+ ``ew_share`` with ``--loss_type ew``, + ``learned_u`` with ``--learned_weights``). DDPM: timestep = index,
  σ = √(1 − ᾱ); flow: σ = (index + 1)/1000, timestep = 1000σ. loss_weight is the product of every enabled
  timestep weight at ``--step``, bounded by library/weighting.MAX_TIMESTEP_WEIGHT, with the map-based weights
  (``--loss_map_offset``) at the ``--loss_map`` FILE (a flat map without one) and times exp(−u) with
  ``--learned_weights``; huber_c is empty when the loss type has no threshold; ew_share is the ew loss's share β
  at each bin (batch median over the trained bins).
* ``--image_out``: histogram of the draws, sampler density, weight (with the bound), effective weight
  (density × weight), Huber threshold, the loss-map sampling density and the map itself (``--loss_map FILE``:
  loss_map.safetensors or loss_map.csv of a run), and the learned weights (``--learned_weights FILE``:
  learned_weighting.safetensors of a run with ``--loss_weighting learned``).

DDPM schedules without a model: SD's scaled_linear 0.00085..0.012, with ``--zero_terminal_snr`` if given.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make `library` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from library import families, loss_config
from library.engine import LossEngine, NoiseLevels
from library.errors import UserError
from library.learned_weighting import LearnedWeighting
from library.losses import THRESHOLD_LOSS_TYPES, ew_blend
from library.weighting import MAX_TIMESTEP_WEIGHT

CURVE_HEADER = "index,timestep,sigma,snr,loss_weight,huber_c"
SAMPLE_HEADER = "step,u,timestep,bin,sigma,snr,sample_weight"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw what the loss and timestep flags mean.", allow_abbrev=False)
    g = parser.add_argument_group("model and run")
    g.add_argument("--model_family", choices=families.names(aliases=True), default="sd1",
                   help="sd1/sd2/sdxl (DDPM) or sd3 (flow)")
    g.add_argument("--v_parameterization", action="store_true")
    g.add_argument("--zero_terminal_snr", action="store_true")
    g.add_argument("--precondition_outputs", action="store_true", help="SD3: x0 preconditioning")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--resolution", type=str, default=None, help="'1024' or 'W,H' (flux_shift); family default")
    g.add_argument("--config_file", type=str, default=None, help="a training TOML; the command line wins")
    g = parser.add_argument_group("outputs")
    g.add_argument("--step", type=int, default=0, help="the training step the curves show (default 0)")
    g.add_argument("--num_samples", type=int, default=10000, help="timestep draws for the histogram")
    g.add_argument("--samples_out", type=str, default=None, help="CSV of the draws")
    g.add_argument("--curves_out", type=str, default=None, help="CSV of the per-timestep curves")
    g.add_argument("--image_out", type=str, default=None, help="PNG of the whole picture")
    g.add_argument("--loss_map", type=str, default=None,
                   help="loss map of a run (loss_map.safetensors or loss_map.csv): its sampling density, and the "
                        "map-based weights at it")
    g.add_argument("--learned_weights", type=str, default=None,
                   help="learned_weighting.safetensors of a run with --loss_weighting learned: draw u(σ) and apply "
                        "exp(−u) to the weights")
    loss_config.add_arguments(parser)
    return parser


def _config_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The keys of a training TOML this tool knows, as command-line tokens (checked like the command line);
    keys only the trainer knows (network, data, ...) are skipped."""
    from library.train_util import actions_by_key, config_to_argv, load_config_file

    known = actions_by_key(parser)
    config = {k: v for k, v in load_config_file(path).items() if k in known and k != "config_file"}
    return config_to_argv(config, parser, f"--config_file {path}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.config_file:
        args = parser.parse_args(_config_argv(args.config_file, parser) + argv)
    return args


def _latent_shape(args: argparse.Namespace) -> tuple[int, int, int, int]:
    family = families.get_family(args.model_family)
    text = args.resolution or str(family.default_resolution)
    try:
        sizes = [int(s) for s in str(text).split(",")]
    except ValueError:
        raise UserError(f"--resolution: '{text}' is not '1024' or 'W,H'") from None
    width, height = sizes[0], sizes[-1]
    return (1, family.latent_channels, height // 8, width // 8)


def make_engine(args: argparse.Namespace) -> LossEngine:
    family = args.model_family
    kind = families.kind_of(family)
    prediction = ("v_prediction" if args.v_parameterization else "epsilon") if kind == "ddpm" else "flow"
    cfg = loss_config.LossConfig.from_args(args, family, prediction)
    return LossEngine(cfg, kind, cfg.prediction_type, None, seed=args.seed or 0, rank=0, world_size=1,
                      max_train_steps=args.max_train_steps, zero_terminal_snr=args.zero_terminal_snr)


def curves(engine: LossEngine, step: int, map_values: torch.Tensor | None = None,
           learned: LearnedWeighting | None = None) -> dict[str, torch.Tensor | None]:
    """Per bin index: timestep, σ, SNR, loss weight, Huber threshold (None without one), ew share (None unless
    ew), learned u (None without). ``map_values``: the loss map the map-based weights use (None: flat)."""
    levels = engine.grid_levels()
    if engine.kind == "ddpm":
        sigma = (1 - engine.schedule.alpha_bar(levels.timesteps)).sqrt()
    else:
        sigma = levels.sigma
    values = map_values if map_values is not None else torch.ones(engine.num_bins)
    weight = engine.timestep_weights(levels, step, map_values=values)
    huber = engine.huber_threshold(levels) if engine.cfg.loss_type in THRESHOLD_LOSS_TYPES else None
    ew = None
    if engine.cfg.loss_type == "ew":  # β per bin, the median taken over a "batch" of every trained bin
        trained = engine.trained_bins
        share = ew_blend(values, levels.bins[trained], step, engine.max_train_steps, trained)
        ew = torch.zeros(engine.num_bins, dtype=torch.float64)
        ew[trained] = share.double()
    u = learned.curve(engine.noise_fraction(levels)) if learned is not None else None
    if u is not None:
        weight = weight * torch.exp(-u)
    return {"timestep": levels.timesteps, "sigma": sigma, "snr": levels.snr, "loss_weight": weight, "huber_c": huber,
            "ew_share": ew, "learned_u": u}


OPTIONAL_COLUMNS = ("ew_share", "learned_u")


def write_curves(path: str, table: dict) -> None:
    extra = [name for name in OPTIONAL_COLUMNS if table.get(name) is not None]
    rows = [",".join([CURVE_HEADER] + extra)]
    for i in range(table["snr"].numel()):
        huber = "" if table["huber_c"] is None else f"{float(table['huber_c'][i]):.10g}"
        rows.append(",".join([f"{i},{float(table['timestep'][i]):.10g},{float(table['sigma'][i]):.10g},"
                              f"{float(table['snr'][i]):.10g},{float(table['loss_weight'][i]):.10g},{huber}"]
                             + [f"{float(table[name][i]):.10g}" for name in extra]))
    _write(path, rows)


def draw_samples(engine: LossEngine, args: argparse.Namespace) -> tuple[list[int], NoiseLevels]:
    """``--num_samples`` draws, ``--train_batch_size`` per step, at consecutive steps from ``--step``."""
    batch = max(args.train_batch_size, 1)
    shape = _latent_shape(args)
    steps, drawn = [], []
    for i in range(math.ceil(args.num_samples / batch)):
        step = args.step + i
        drawn.append(engine.sample_levels(step, batch, latent_shape=(batch,) + shape[1:]))
        steps += [step] * batch
    cat = lambda name: torch.cat([getattr(l, name) for l in drawn])[: args.num_samples]  # noqa: E731
    sigma = cat("sigma") if engine.kind == "flow" else None
    levels = NoiseLevels(u=cat("u"), timesteps=cat("timesteps"), bins=cat("bins"), snr=cat("snr"), sigma=sigma,
                         sample_weight=cat("sample_weight"))
    return steps[: args.num_samples], levels


def write_samples(path: str, steps: list[int], levels: NoiseLevels) -> None:
    rows = [SAMPLE_HEADER]
    sigma = levels.sigma.tolist() if levels.sigma is not None else [""] * len(steps)
    for row in zip(steps, levels.u.tolist(), levels.timesteps.tolist(), levels.bins.tolist(), sigma,
                   levels.snr.tolist(), levels.sample_weight.tolist()):
        rows.append(",".join(str(x) for x in row))
    _write(path, rows)


def _write(path: str, rows: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")


def read_loss_map(engine: LossEngine, path: str) -> torch.Tensor:
    """The values of a loss-map file (.safetensors or .csv); the engine's own map (if any) takes them too."""
    from library.loss_map import LossMap

    loss_map = LossMap(engine.num_bins)
    loss_map.load_any(path, "--loss_map")
    if engine.loss_map is not None:
        engine.loss_map.values.copy_(loss_map.values)
    return loss_map.values


def loss_map_density(engine: LossEngine, values: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The sampling probabilities over bins a loss map gives (mixed with the base sampler by --loss_map_mix)."""
    from library.loss_map import LossMap

    if engine.cfg.timestep_sampling == "loss_map":
        return engine.bin_probabilities(args.step)
    loss_map = LossMap(engine.num_bins)
    loss_map.values.copy_(values)
    base = engine.bin_probabilities(args.step, _latent_shape(args))
    return loss_map.sampling_probs(base, engine.cfg.loss_map_mix).double()


def flag_summary(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The flags that differ from their defaults, for the figure title."""
    skip = {"config_file", "samples_out", "curves_out", "image_out", "loss_map", "learned_weights", "num_samples",
            "help"}
    parts = [f"{args.model_family}"]
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "model_family":
            continue
        value = getattr(args, action.dest)
        if value is not None and value != action.default:
            parts.append(action.option_strings[0] + ("" if value is True else f" {value}"))
    return " ".join(parts)


def draw(path: str, engine: LossEngine, table: dict, levels: NoiseLevels, density: torch.Tensor,
         map_probs: torch.Tensor | None, title: str, step: int, map_values: torch.Tensor | None = None) -> None:
    """The figure (matplotlib Agg canvas: no display, no global backend switch)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = engine.num_bins
    index = np.arange(T)
    density = density.numpy() * T
    weight = table["loss_weight"].double().numpy()
    if engine.cfg.timestep_sampling == "loss_map" and engine.cfg.loss_map_unbiased:
        density_for_effect = engine.base_bin_probs.numpy() * T  # P·(P_base/P): importance weights undo the map
    else:
        density_for_effect = density
    effective = density_for_effect * weight
    effective = effective / max(effective.mean(), 1e-300)
    axis_label = "timestep t" if engine.kind == "ddpm" else "bin = floor(1000σ)"

    figure = Figure(figsize=(16, 6.4), dpi=72)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 4)
    ax = axes[0, 0]
    ax.hist(levels.bins.numpy(), bins=50, range=(0, T), density=True, color="tab:blue", alpha=0.6, label="draws")
    ax.plot(index, density / T, color="black", linewidth=1, label="density")
    ax.set_title(f"{levels.bins.numel()} draws"), ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(index, density, color="black")
    ax.set_title("sampling density (× T)")
    ax.set_ylim(0, max(float(density.max()) * 1.1, 1e-9))  # a flat density must not zoom into rounding noise
    ax = axes[0, 2]
    ax.plot(index, weight, color="tab:red", label="weight")
    if weight.max() / max(weight.min(), 1e-300) > 100:
        ax.set_yscale("log")
    if weight.max() >= 0.1 * MAX_TIMESTEP_WEIGHT:  # the documented bound, where it matters
        ax.axhline(MAX_TIMESTEP_WEIGHT, color="black", linestyle="--", linewidth=1,
                   label=f"bound {MAX_TIMESTEP_WEIGHT:g}")
        ax.legend(fontsize=8)
    ax.set_title(f"loss weight at step {step}" + (" (× learned)" if table.get("learned_u") is not None else ""))
    ax = axes[0, 3]
    if table.get("learned_u") is not None:
        u = table["learned_u"].numpy()
        ax.plot(index, np.exp(-u), color="tab:red", label="exp(−u)")
        ax.set_yscale("log")
        twin = ax.twinx()
        twin.plot(index, u, color="tab:blue", linewidth=1, label="u ≈ log E[loss]")
        twin.set_ylabel("u", fontsize=8)
        ax.legend(loc="upper left", fontsize=8), twin.legend(loc="upper right", fontsize=8)
        ax.set_title("learned weighting: exp(−u) and u")
    else:
        ax.text(0.5, 0.5, "no --learned_weights file", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("learned weighting")
    ax = axes[1, 0]
    ax.plot(index, effective, color="tab:purple")
    ax.set_title("effective weight = density × weights (mean 1)")
    ax.set_ylim(0, max(float(effective.max()) * 1.1, 1e-9))
    ax = axes[1, 1]
    if table["huber_c"] is not None:
        ax.plot(index, table["huber_c"].double().numpy(), color="tab:green")
        ax.set_title(f"Huber threshold c ({engine.cfg.huber_schedule})")
    else:
        ax.text(0.5, 0.5, f"no threshold (loss {engine.cfg.loss_type})", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_title("Huber threshold c")
    ax = axes[1, 2]
    if map_probs is not None:
        ax.plot(index, map_probs.numpy() * T, color="tab:orange")
        ax.set_title(f"loss-map sampling density (mix {engine.cfg.loss_map_mix})")
    else:
        ax.text(0.5, 0.5, "no --loss_map file", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("loss-map sampling density")
    ax = axes[1, 3]
    if map_values is not None:
        ax.plot(index, map_values.numpy(), color="tab:brown", label="loss map")
        if table.get("ew_share") is not None:
            twin = ax.twinx()
            twin.plot(index, table["ew_share"].numpy(), color="tab:gray", linewidth=1, label="ew share β")
            twin.legend(loc="upper right", fontsize=8)
        ax.set_title("the loss map")
    else:
        ax.text(0.5, 0.5, "no --loss_map file", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("the loss map")
    for ax in axes.flat:
        ax.set_xlim(0, T - 1)
        ax.set_xlabel(axis_label, fontsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle(textwrap.fill(title, 140), fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        engine = make_engine(args)
        map_values = read_loss_map(engine, args.loss_map) if args.loss_map else None
        learned = LearnedWeighting.from_file(args.learned_weights) if args.learned_weights else None
        table = curves(engine, args.step, map_values, learned)
        if args.curves_out:
            write_curves(args.curves_out, table)
        capped = int((table["loss_weight"] >= MAX_TIMESTEP_WEIGHT).sum()) if learned is None else 0
        if capped:
            print(f"note: the loss weight reaches the bound {MAX_TIMESTEP_WEIGHT:g} at {capped} of "
                  f"{engine.num_bins} noise levels (docs/losses-and-timesteps.md, 'Bound')")
        map_probs = loss_map_density(engine, map_values, args) if map_values is not None else None
        if args.samples_out or args.image_out:
            steps, levels = draw_samples(engine, args)
            if args.samples_out:
                write_samples(args.samples_out, steps, levels)
            if args.image_out:
                density = engine.bin_probabilities(args.step, _latent_shape(args))
                draw(args.image_out, engine, table, levels, density, map_probs, flag_summary(args, build_parser()),
                     args.step, map_values)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
