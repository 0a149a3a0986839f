"""The kohya-compatible argument layer.

Flag groups with KS names (`add_*_arguments`), `--config_file` / `--output_config`, and the KS facade
`conditional_loss`. Everything here is about *parsing*; the work lives in the focused modules it calls.

Config files differ from KS on purpose: every TOML value goes through the same type, choices and validation as
the command line (KS assigns them unchecked), and an unknown key is an error that names the closest valid flag.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
from typing import Any, Sequence

import toml

from library.errors import UserError, unknown_key_message
from library import ks_compat, loss_config, memory_modes, metadata, metrics, optimizers, preflight, speed
from library.families import get_family
from library.fileio import atomic_write_text
from library.losses import conditional_loss  # noqa: F401  (KS facade, re-exported for users' patches)


# ----------------------------------------------------------------------------------------------------------------
# Flag groups
# ----------------------------------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, family: str) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="diffusers folder or single-file .safetensors checkpoint (original layout)")
    g.add_argument("--model_config", type=str, default=None,
                   help="folder with a diffusers layout of configs: overrides the shipped architecture for single files")
    g.add_argument("--vae", type=str, default=None, help="separate VAE (diffusers folder or single file)")
    g.add_argument("--allow_pickle", action="store_true",
                   help="allow .ckpt/.pt pickle checkpoints (loaded with weights_only=True)")
    g.add_argument("--max_token_length", type=int, default=None, choices=[None, 150, 225],
                   help="max caption tokens (75 if omitted; 150/225 split into 75-token chunks as KS)")
    g.add_argument("--zero_terminal_snr", action="store_true", help="rescale the noise schedule to zero terminal SNR")
    g.add_argument("--v_parameterization", action="store_true", help="v-prediction objective")
    get_family(family).add_arguments(g)   # the family's own model flags
    g.add_argument("--no_half_vae", action="store_true",
                   help="keep the VAE in fp32 under --mixed_precision fp16/bf16 (KS); without it the VAE runs "
                        "in that dtype, except an fp16 VAE whose config says force_upcast")
    g.add_argument("--sdpa", action="store_true", help="accepted for KS compatibility: PyTorch SDPA is always used")
    g.add_argument("--xformers", action="store_true", help="use xformers attention (must be installed)")


def add_dataset_arguments(parser: argparse.ArgumentParser, family: str) -> None:
    """KS `add_dataset_arguments` (train_network.py passes True for DreamBooth folders, captions and caption
    dropout), with KS names, types, defaults and choices; plus our data-loader and text-encoder-cache flags.
    What each does here, and what is refused, is in docs/datasets.md."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="folder of '<repeats>_<class tokens>' subfolders (with --in_json: the folder of the images)")
    g.add_argument("--cache_info", action="store_true",
                   help="KS: cache image sizes and captions; no effect here (every image is scanned up front)")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle the caption's tags every time")
    g.add_argument("--caption_separator", type=str, default=",", help="separator between tags (default ',')")
    g.add_argument("--caption_extension", type=str, default=".caption",
                   help="caption file extension (default .caption, falling back to .txt)")
    g.add_argument("--caption_extention", type=str, default=None,
                   help="KS's old spelling of --caption_extension; wins over it when given (as KS)")
    g.add_argument("--keep_tokens", type=int, default=0, help="keep the first N tags in place when shuffling")
    g.add_argument("--keep_tokens_separator", type=str, default="",
                   help="tags before this separator (and after a second one) stay in place, e.g. '|||'")
    g.add_argument("--secondary_separator", type=str, default=None,
                   help="joins words of one tag through shuffling/dropout; replaced by --caption_separator after")
    g.add_argument("--enable_wildcard", action="store_true",
                   help="'{a|b|c}' in captions picks one option each time; a multi-line caption picks one line")
    g.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    g.add_argument("--color_aug", action="store_true", help="weak hue / gamma augmentation")
    g.add_argument("--flip_aug", action="store_true",
                   help="horizontal flip with probability 0.5 (with --cache_latents both flips are cached)")
    g.add_argument("--face_crop_aug_range", type=str, default=None,
                   help="KS face-centred crop; refused here (needs KS's face-box file names)")
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crop to the bucket")
    g.add_argument("--alpha_mask", action="store_true",
                   help="use each image's alpha channel as its loss mask (KS; see --masked_loss)")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="--masked_loss: folder of mask images named like the --train_data_dir images (KS)")
    g.add_argument("--debug_dataset", action="store_true",
                   help="print the batches of the first epoch (images, buckets, crops, flips, captions) and exit "
                        "without loading models")
    g.add_argument("--resolution", type=str, default=None, help="'512' or '512,768' (width,height)")
    g.add_argument("--cache_latents", action="store_true", help="encode every image once, before training")
    g.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    g.add_argument("--cache_latents_to_disk", action="store_true",
                   help="cache latents in files beside the images (implies --cache_latents)")
    g.add_argument("--skip_cache_check", action="store_true",
                   help="reuse existing cache files without checking what they were computed from")
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    g.add_argument("--bucket_reso_steps", type=int, default=get_family(family).bucket_reso_steps,
                   help="bucket sides are multiples of this (KS: 64)")
    g.add_argument("--bucket_no_upscale", action="store_true", help="never enlarge images to fill a bucket")
    g.add_argument("--resize_interpolation", type=str, default=None,
                   choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"],
                   help="resize filter (default: lanczos)")
    g.add_argument("--token_warmup_min", type=int, default=1, help="tags kept at step 0 with --token_warmup_step")
    g.add_argument("--token_warmup_step", type=float, default=0,
                   help="the number of tags grows from --token_warmup_min to all by this step (a share of "
                        "--max_train_steps if < 1)")
    g.add_argument("--dataset_class", type=str, default=None,
                   help="KS custom dataset class; refused here (use --dataset_config or --in_json)")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="share of samples with an empty caption")
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                   help="every N-th epoch trains with empty captions")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="probability of dropping each tag")
    g.add_argument("--reg_data_dir", type=str, default=None, help="regularisation images, same layout")
    g.add_argument("--in_json", type=str, default=None,
                   help="KS fine-tuning metadata JSON (captions / tags per image in --train_data_dir)")
    g.add_argument("--dataset_repeats", type=int, default=1,
                   help="repeats of --in_json images (and of dataset TOML subsets without num_repeats)")
    # Not in KS's dataset group, kept here with the data flags.
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    g.add_argument("--dataset_config", type=Path, default=None, help="dataset TOML (KS schema)")
    if get_family(family).text_encoder_cache:
        g.add_argument("--cache_text_encoder_outputs", action="store_true")
        g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true")
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--max_data_loader_n_workers", type=int, default=8,
                   help="data-loader worker processes, at most the CPU count (KS); none when latents are cached")
    g.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="accepted for KS compatibility: workers are started per epoch here")


def add_network_arguments(parser: argparse.ArgumentParser, family: str) -> None:
    g = parser.add_argument_group("network")
    g.add_argument("--network_module", type=str, default=None, help="networks.lora when omitted")
    g.add_argument("--network_dim", type=int, default=None, help="LoRA rank (KS default 4)")
    g.add_argument("--network_alpha", type=float, default=1.0, help="scale = alpha / rank")
    g.add_argument("--network_args", type=str, nargs="*", default=None, help="key=value: conv_dim, conv_alpha, ...")
    g.add_argument("--network_dropout", type=float, default=None, help="neuron dropout on the down projection")
    g.add_argument("--network_weights", type=str, default=None, help="start from an existing LoRA")
    g.add_argument("--dim_from_weights", action="store_true", help="take dims/alphas from --network_weights")
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="max-norm regularisation: after each step scale every LoRA module whose update norm exceeds "
                        "this (KS; 1 is a good start)")
    g.add_argument("--network_train_unet_only", action="store_true")
    g.add_argument("--network_train_text_encoder_only", action="store_true")
    g.add_argument("--unet_lr", type=float, default=None)
    g.add_argument("--text_encoder_lr", type=float, nargs="*", default=None,
                   help="one value, or one per text encoder (sdxl/sd3)")
    g.add_argument("--training_comment", type=str, default=None)
    g.add_argument("--base_weights", type=str, nargs="*", default=None,
                   help="LoRA files merged into the frozen model before training (KS)")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None,
                   help="one multiplier per --base_weights file (default 1.0)")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default=None)
    g.add_argument("--output_name", type=str, default=None,
                   help="file name without extension (unset: last, at-stepNNNNNNNN, epoch-NNNNNN as KS)")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
                   help="only safetensors is written (ckpt/pt are refused)")
    g.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_every_n_epochs", type=int, default=None)
    g.add_argument("--save_n_epoch_ratio", type=int, default=None,
                   help="save N times over the run: every floor(epochs / N) epochs (KS)")
    g.add_argument("--save_last_n_steps", type=int, default=None, help="keep step saves of the last N steps only")
    g.add_argument("--save_last_n_epochs", type=int, default=None, help="keep the last N epoch saves only")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None,
                   help="keep the last N epoch state folders (default: --save_last_n_epochs)")
    g.add_argument("--save_last_n_steps_state", type=int, default=None,
                   help="keep the state folders of the last N steps (default: --save_last_n_steps)")
    g.add_argument("--save_state", action="store_true", help="save the training state with every LoRA save")
    g.add_argument("--save_state_on_train_end", action="store_true")
    g.add_argument("--resume", type=str, default=None, help="state folder to resume from")
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--full_fp16", action="store_true")
    g.add_argument("--full_bf16", action="store_true")
    g.add_argument("--seed", type=int, default=None, help="random (printed, and saved as ss_seed) when omitted")
    g.add_argument("--ddp_timeout", type=int, default=None, help="multi-process: process-group timeout in minutes")
    g.add_argument("--logging_dir", type=str, default=None)
    g.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"])
    g.add_argument("--log_prefix", type=str, default=None)
    g.add_argument("--log_tracker_name", type=str, default=None)
    g.add_argument("--wandb_run_name", type=str, default=None, help="the wandb run's name")
    g.add_argument("--log_tracker_config", type=str, default=None, help="TOML of tracker init arguments (KS)")
    g.add_argument("--wandb_api_key", type=str, default=None, help="log in to wandb with this key")
    g.add_argument("--log_config", action="store_true",
                   help="log the run's flags to the tracker (paths and keys left out)")
    g.add_argument("--console_log_level", type=str, default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="Python logging level")
    g.add_argument("--sample_prompts", type=str, default=None)
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true", help="also sample before the first step")
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_sampler", type=str, default="ddim",
                   choices=["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                            "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"])
    g.add_argument("--lowram", action="store_true", help="accepted for KS compatibility (no effect here)")
    speed.add_arguments(g)  # --torch_compile, --dynamo_backend (KS), --channels_last


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """KS `add_optimizer_arguments`: names, types and defaults as KS (see library/optimizers.py)."""
    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer_type", type=str, default="",
                   help="AdamW (default), AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, "
                        "PagedLion8bit, SGDNesterov, SGDNesterov8bit, Adafactor, Prodigy, DAdaptation "
                        "(DAdaptAdamPreprint), DAdaptAdaGrad, DAdaptAdam, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, "
                        "AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree, or module.Class")
    g.add_argument("--use_8bit_adam", action="store_true", help="KS's old name for --optimizer_type AdamW8bit")
    g.add_argument("--use_lion_optimizer", action="store_true", help="KS's old name for --optimizer_type Lion")
    g.add_argument("--learning_rate", type=float, default=2.0e-6,
                   help="KS's default 2e-6 is meant for full fine-tuning: LoRA recipes use 1e-4 (see docs/training.md)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--optimizer_args", type=str, nargs="*", default=None, help="key=value optimizer arguments")
    g.add_argument("--lr_scheduler_type", type=str, default="",
                   help="any scheduler class: module.Class, or a name from torch.optim.lr_scheduler")
    g.add_argument("--lr_scheduler_args", type=str, nargs="*", default=None,
                   help="key=value arguments of the scheduler (T_max=100; step_rules='1:10,0.1' for piecewise_constant)")
    g.add_argument("--lr_scheduler", type=str, default="constant", help=", ".join(optimizers.SCHEDULERS))
    g.add_argument("--lr_warmup_steps", type=optimizers.int_or_float, default=0,
                   help="warmup steps, or a ratio of the training steps (0.1 or 10%%)")
    g.add_argument("--lr_decay_steps", type=optimizers.int_or_float, default=0,
                   help="decay steps of warmup_stable_decay, or a ratio of the training steps")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="cosine_with_restarts: restarts")
    g.add_argument("--lr_scheduler_power", type=float, default=1, help="polynomial: power")
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="accepted for KS compatibility: KS's LoRA trainers do not use it either")
    g.add_argument("--lr_scheduler_timescale", type=int, default=None,
                   help="inverse_sqrt: timescale (default: the warmup steps)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                   help="cosine_with_min_lr / warmup_stable_decay: the lowest lr as a ratio of the initial lr")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("config")
    g.add_argument("--config_file", type=str, default=None, help="TOML with any flag as a key")
    g.add_argument("--output_config", action="store_true",
                   help="write the effective config to --config_file and exit (KS behaviour)")


def setup_parser(family: str) -> argparse.ArgumentParser:
    """All flags of one trainer, in KS groups."""
    get_family(family)  # ValueError for an unknown family
    parser = argparse.ArgumentParser(description=f"LoRA training ({family})", allow_abbrev=False)
    add_model_arguments(parser, family)
    add_dataset_arguments(parser, family)
    add_network_arguments(parser, family)
    add_training_arguments(parser)
    add_optimizer_arguments(parser)
    loss_config.add_arguments(parser)
    metrics.add_metric_arguments(parser)
    memory_modes.add_arguments(parser)
    metadata.add_metadata_arguments(parser)
    add_config_arguments(parser)
    ks_compat.add_arguments(parser, family)  # the remaining KS flags: refused or no-op, see docs/kohya-compat.md
    preflight.add_arguments(parser)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# --config_file
# ----------------------------------------------------------------------------------------------------------------
def load_config_file(path: str) -> dict[str, Any]:
    """Flat {key: value} from a TOML file. Sections only group keys (KS): their names are ignored."""
    if not os.path.isfile(path):
        if os.path.isfile(path + ".toml"):
            path = path + ".toml"
        else:
            raise UserError(f"--config_file: {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = toml.load(f)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config_file: {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """TOML key -> action: every flag name without its dashes, so aliases (snr_gamma, training_shift) work too."""
    return {opt.lstrip("-"): a for a in parser._actions if a.dest != "help" for opt in a.option_strings}


def config_to_argv(config: dict[str, Any], parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Turn TOML values into command-line tokens, checking each against its flag's type and choices.

    Errors name the file and the key; unknown keys suggest the closest valid one."""
    actions = actions_by_key(parser)
    argv: list[str] = []
    for key, value in config.items():
        action = actions.get(key)
        if action is None or key in ("config_file", "output_config"):
            raise UserError(unknown_key_message(key, actions.keys(), where))
        flag = "--" + key
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise UserError(f"{where}: key '{key}' must be true or false, got {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and action.nargs not in ("*", "+") and not isinstance(action.nargs, int):
            raise UserError(f"{where}: key '{key}' takes a single value, got a list {value!r}")
        if isinstance(value, dict):
            raise UserError(f"{where}: key '{key}' takes a value, got a table")
        tokens = []
        for v in values:
            if isinstance(v, bool) and action.type is not None and action.type is not str:
                raise UserError(f"{where}: key '{key}' expects {_type_name(action)}, got {v!r}")
            token = str(v)
            if action.type is not None:
                try:
                    converted = action.type(token)
                except (TypeError, ValueError):
                    raise UserError(f"{where}: key '{key}' expects {_type_name(action)}, got {v!r}") from None
                if action.type in (int,) and isinstance(v, float) and not float(v).is_integer():
                    raise UserError(f"{where}: key '{key}' expects an integer, got {v!r}")
                if action.choices is not None and converted not in action.choices:
                    raise UserError(f"{where}: key '{key}' must be one of "
                                    f"{[c for c in action.choices if c is not None]}, got {v!r}")
            tokens.append(token)
        argv.append(flag)
        argv.extend(tokens)
    return argv


def _type_name(action: argparse.Action) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(action.type, getattr(action.type, "__name__", "a value"))


def parse_args(family: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line, with `--config_file` values underneath it (the command line wins)."""
    parser = setup_parser(family)
    argv = list(sys.argv[1:] if argv is None else argv)
    first = _parse_one_line_errors(parser, argv)
    if first.config_file and not first.output_config:
        config = load_config_file(first.config_file)
        file_argv = config_to_argv(config, parser, f"--config_file {first.config_file}")
        args = _parse_one_line_errors(parser, file_argv + argv)
    else:
        args = first
    if args.output_config:
        if not args.config_file:
            raise UserError("--output_config: also give --config_file PATH, where the effective config is written")
        path = preflight.output_config_path(args)
        write_config_file(args, parser, path)
        print(f"wrote the effective config to {path}")
        raise SystemExit(0)
    return args


def _parse_one_line_errors(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but a mistake is one UserError line (an unknown flag names the closest one), not the usage."""
    def error(message: str):
        raise UserError(message)

    parser.error = error  # argparse reports bad values through self.error
    args, unknown = parser.parse_known_args(argv)
    flags = [token for token in unknown if token.startswith("-")]
    if unknown:
        flag = (flags or unknown)[0].split("=", 1)[0]
        raise UserError(unknown_key_message(flag, [o for a in parser._actions for o in a.option_strings],
                                            "the command line", kind="flag"))
    return args


def write_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, path: str) -> None:
    """The effective config as flat TOML (only values that differ from the defaults; None is omitted)."""
    actions = _actions_by_dest(parser)
    out = {}
    for dest, action in actions.items():
        if dest in ("config_file", "output_config"):
            continue
        value = getattr(args, dest, None)
        if value is None or value == action.default:
            continue
        out[dest] = str(value) if isinstance(value, Path) else value
    if not path.endswith(".toml"):
        path += ".toml"
    text = toml.dumps(out)  # fails (if at all) before the file is touched
    atomic_write_text(path, text)


def run_cli(main, family: str, argv: Sequence[str] | None = None) -> int:
    """Entry-point wrapper: user mistakes print `error: ...` and exit 2 with no traceback."""
    try:
        args = parse_args(family, argv)
        main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during set-up (inside the steps, Ctrl-C finishes the step and saves)
        print("\nstopped by Ctrl-C outside the training steps: nothing to save now; earlier saves are intact",
              file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave the process group on every exit path (errors, Ctrl-C too): gloo aborts the process otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
