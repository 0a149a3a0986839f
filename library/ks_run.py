"""KS run-time behaviours the loop calls with a line each: tracker setup (--log_config, --log_tracker_config,
--wandb_run_name, --wandb_api_key), the process-group timeout (--ddp_timeout), --base_weights merged into the frozen
model, the data-loader worker count, --save_n_epoch_ratio, the validation-batch limit (--max_validation_steps).
Facts from KS train_network.py / train_util.py; each function takes the parsed flags and returns plain values.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
from typing import Any

import toml

from library.errors import UserError

# KS get_sanitized_config_or_none: never sent to a tracker
SENSITIVE = ("wandb_api_key", "huggingface_token")
PATHS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir", "conditioning_data_dir",
         "reg_data_dir", "output_dir", "logging_dir")


def check(args: argparse.Namespace) -> None:
    """Up-front checks of the flags handled here (before any model loads)."""
    if args.console_log_level:
        logging.getLogger().setLevel(args.console_log_level)
    if args.log_tracker_config and not os.path.isfile(args.log_tracker_config):
        raise UserError(f"--log_tracker_config: {args.log_tracker_config} does not exist")
    if args.log_tracker_config:
        tracker_init_kwargs(args)  # parse errors now
    for path in args.base_weights or []:
        if not os.path.isfile(path):
            raise UserError(f"--base_weights: {path} does not exist")
    multipliers = args.base_weights_multiplier or []
    if multipliers and not args.base_weights:
        raise UserError("--base_weights_multiplier needs --base_weights FILE ...")
    if len(multipliers) > len(args.base_weights or []):
        raise UserError(f"--base_weights_multiplier: {len(multipliers)} values for {len(args.base_weights)} "
                        f"--base_weights files; give at most one per file")
    if args.sample_at_first and not args.sample_prompts:
        raise UserError("--sample_at_first needs --sample_prompts FILE")
    if args.save_n_epoch_ratio is not None and args.save_n_epoch_ratio < 1:
        raise UserError("--save_n_epoch_ratio must be a positive integer (how many saves over the run)")
    for flag in ("save_last_n_steps_state", "save_last_n_epochs_state", "max_validation_steps", "ddp_timeout"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be a positive integer (omit it to disable)")


def accelerator_kwargs(args: argparse.Namespace) -> list:
    """--ddp_timeout (minutes): the process-group timeout, as KS passes it to accelerate."""
    if not args.ddp_timeout:
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout))]


def tracker_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """--log_config: the run's flags for the tracker, without keys and local paths (KS); None without the flag."""
    if not args.log_config:
        return None
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in SENSITIVE or key in PATHS:
            continue
        out[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return out


def tracker_init_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """--log_tracker_config (a TOML of per-tracker init arguments) and --wandb_run_name, as KS."""
    kwargs: dict[str, Any] = {}
    if args.log_tracker_config:
        try:
            kwargs = toml.load(args.log_tracker_config)
        except (toml.TomlDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--log_tracker_config: {args.log_tracker_config} is not valid TOML: {e}") from None
    if args.wandb_run_name:
        kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    return kwargs


def login_wandb(args: argparse.Namespace) -> None:
    if args.wandb_api_key and args.log_with in ("wandb", "all"):
        importlib.import_module("wandb").login(key=args.wandb_api_key)


def data_loader_workers(requested: int, latents_cached: bool) -> int:
    """KS caps the workers at the CPU count; with cached latents loading is a tensor lookup, so none are started
    (the batches are the same either way: their randomness is keyed on (epoch, batch), not on the worker)."""
    if latents_cached:
        return 0
    return max(0, min(requested, os.cpu_count() or 1))


def save_every_n_epochs(args: argparse.Namespace, num_epochs: int) -> int | None:
    """--save_n_epoch_ratio N: save every floor(epochs / N) epochs, at least every epoch (KS; it wins over
    --save_every_n_epochs)."""
    if args.save_n_epoch_ratio:
        return max(1, num_epochs // args.save_n_epoch_ratio)
    return args.save_every_n_epochs


def merge_base_weights(args: argparse.Namespace, models: Any, weight_dtype, device) -> None:
    """--base_weights: LoRA files merged into the frozen weights before training (KS), each with its multiplier."""
    if not args.base_weights:
        return
    from networks import network_args

    network_module = args.network_module or "networks.lora"
    text_encoders = models.text_encoders if len(models.text_encoders) > 1 else models.text_encoders[0]
    for i, path in enumerate(args.base_weights):
        multipliers = args.base_weights_multiplier or []
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        print(f"merging --base_weights {path} with multiplier {multiplier}")
        network, weights = network_args.create_network_from_weights(network_module, multiplier, path, models.vae,
                                                                    text_encoders, models.denoiser, for_inference=True)
        network_args.merge_network(network, network_module, text_encoders, models.denoiser, weights, weight_dtype,
                                   device)  # KS passes the weights
