"""Show what the loss / timestep flags of a training run mean, without a model.

    python tools/show_timesteps.py --model_family sd1 --timestep_sampling logit_normal --min_snr_gamma 5 \\
        --curves_out curves.csv --samples_out samples.csv --image_out timesteps.png
    python tools/show_timesteps.py --model_family sd3 --config_file run.toml --image_out timesteps.png

It takes the training flags (or a training ``--config_file``; keys this tool does not know are skipped) and
goes through the same code the trainer does (library/engine.py):

* ``--samples_out``: the timesteps a run draws (``--num_samples`` draws, ``--train_batch_size`` per step from
  ``--step`` on): step, u, timestep, bin, sigma, snr, sample_weight.
* ``--curves_out``: one row per bin index (1000 rows), header ``index,timestep,sigma,snr,loss_weight,huber_c``.
  DDPM: timestep = index, σ = √(1 − ᾱ); flow: σ = (index + 1)/1000, timestep = 1000σ. loss_weight is the
  product of every enabled timestep weight at ``--step`` (loss-map weights at a flat map); huber_c is empty when
  the loss type has no threshold.
* ``--image_out``: histogram of the draws, sampler density, weight, effective weight (density × weight), Huber
  threshold, and with ``--loss_map FILE`` (safetensors with tensor ``loss_map``) the loss-map sampling density.

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
from library.losses import THRESHOLD_LOSS_TYPES

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
    g.add_argument("--loss_map", type=str, default=None, help="loss-map .safetensors: draw its sampling density")
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


def curves(engine: LossEngine, step: int) -> dict[str, torch.Tensor | None]:
    """Per bin index: timestep, σ, SNR, loss weight (flat loss map), Huber threshold (None without one)."""
    levels = engine.grid_levels()
    if engine.kind == "ddpm":
        sigma = (1 - engine.schedule.alpha_bar(levels.timesteps)).sqrt()
    else:
        sigma = levels.sigma
    weight = engine.timestep_weights(levels, step, map_values=torch.ones(engine.num_bins))  # a flat map
    huber = engine.huber_threshold(levels) if engine.cfg.loss_type in THRESHOLD_LOSS_TYPES else None
    return {"timestep": levels.timesteps, "sigma": sigma, "snr": levels.snr, "loss_weight": weight, "huber_c": huber}


def write_curves(path: str, table: dict) -> None:
    rows = [CURVE_HEADER]
    for i in range(table["snr"].numel()):
        huber = "" if table["huber_c"] is None else f"{float(table['huber_c'][i]):.10g}"
        rows.append(f"{i},{float(table['timestep'][i]):.10g},{float(table['sigma'][i]):.10g},"
                    f"{float(table['snr'][i]):.10g},{float(table['loss_weight'][i]):.10g},{huber}")
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


def loss_map_density(engine: LossEngine, path: str, args: argparse.Namespace) -> torch.Tensor:
    """The sampling probabilities over bins a loss map gives (mixed with the base sampler by --loss_map_mix)."""
    from library.loss_map import LossMap

    loss_map = LossMap(engine.num_bins)
    loss_map.load_file(path)
    if engine.cfg.timestep_sampling == "loss_map":
        engine.loss_map.values.copy_(loss_map.values)
        return engine.bin_probabilities(args.step)
    base = engine.bin_probabilities(args.step, _latent_shape(args))
    return loss_map.sampling_probs(base, engine.cfg.loss_map_mix).double()


def flag_summary(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The flags that differ from their defaults, for the figure title."""
    skip = {"config_file", "samples_out", "curves_out", "image_out", "loss_map", "num_samples", "help"}
    parts = [f"{args.model_family}"]
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "model_family":
            continue
        value = getattr(args, action.dest)
        if value is not None and value != action.default:
            parts.append(action.option_strings[0] + ("" if value is True else f" {value}"))
    return " ".join(parts)


def draw(path: str, engine: LossEngine, table: dict, levels: NoiseLevels, density: torch.Tensor,
         map_probs: torch.Tensor | None, title: str, step: int) -> None:
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

    figure = Figure(figsize=(12, 6.4), dpi=72)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    ax = axes[0, 0]
    ax.hist(levels.bins.numpy(), bins=50, range=(0, T), density=True, color="tab:blue", alpha=0.6, label="draws")
    ax.plot(index, density / T, color="black", linewidth=1, label="density")
    ax.set_title(f"{levels.bins.numel()} draws"), ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(index, density, color="black")
    ax.set_title("sampling density (× T)")
    ax.set_ylim(0, max(float(density.max()) * 1.1, 1e-9))  # a flat density must not zoom into rounding noise
    ax = axes[0, 2]
    ax.plot(index, weight, color="tab:red")
    if weight.max() / max(weight.min(), 1e-300) > 100:
        ax.set_yscale("log")
    ax.set_title(f"loss weight at step {step}")
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
        table = curves(engine, args.step)
        if args.curves_out:
            write_curves(args.curves_out, table)
        map_probs = loss_map_density(engine, args.loss_map, args) if args.loss_map else None
        if args.samples_out or args.image_out:
            steps, levels = draw_samples(engine, args)
            if args.samples_out:
                write_samples(args.samples_out, steps, levels)
            if args.image_out:
                density = engine.bin_probabilities(args.step, _latent_shape(args))
                draw(args.image_out, engine, table, levels, density, map_probs, flag_summary(args, build_parser()),
                     args.step)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
