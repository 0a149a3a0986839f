"""What we do with every flag of kohya sd-scripts (KS): one table, the only place that says it.

Each KS flag of train_network.py, sdxl_train_network.py and sd3_train_network.py has one disposition:
* honoured: it does what it does in KS (the text says how, where it differs in detail);
* refused: accepted by the parser (so `--help` lists it and a KS TOML with its default loads), but a value other
  than KS's default stops the run before any model loads, with why and what to use instead;
* no-op: accepted, and a value other than the default prints one note, only where the flag changes nothing here;
* pending: another change implements it now (the test's PENDING set holds the same names).

`add_arguments` adds the KS flags that no other flag group defines (with KS's types, defaults and choices);
`check` refuses or notes them; `markdown` writes docs/kohya-compat.md (`python -m library.ks_compat --write`).
tests/fixtures/ks_flags.json is KS's own list (tools/ks_flag_inventory.py), which the tests compare against.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from library.errors import UserError

HONOURED, REFUSED, NO_OP, PENDING = "honoured", "refused", "no-op", "pending"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "ks_flags.json")
DOC = os.path.join(ROOT, "docs", "kohya-compat.md")


@dataclass(frozen=True)
class Disposition:
    kind: str
    text: str = ""
    checked_elsewhere: bool = False  # the owning module refuses / notes it itself (check() leaves it alone)


def honoured(text: str = "") -> Disposition:
    return Disposition(HONOURED, text)


def refused(text: str) -> Disposition:
    return Disposition(REFUSED, text)


def no_op(text: str) -> Disposition:
    return Disposition(NO_OP, text)


def pending(owner: str) -> Disposition:
    return Disposition(PENDING, f"being implemented ({owner})")


_DATA = "ksdata"
_SD3 = "the SD3 issue"
_NO_UPLOAD = refused("uploads to the Hugging Face Hub are not built in (no network at training time); upload the "
                     "output folder afterwards with `huggingface-cli upload`")
_NO_DEEPSPEED = refused("DeepSpeed is not supported: a LoRA's trainable state is small; use --gradient_checkpointing, "
                        "--mixed_precision and --cache_latents to save memory")
_NO_DDP_WRAP = no_op("the network is not wrapped in DDP here: LoRA gradients are averaged with one all-reduce per step")

# Flag name (KS's first option string, without dashes) -> its disposition; for a flag some families define
# themselves and the others only accept for KS: {"own": ..., "compat": ...}.
DISPOSITIONS: dict[str, Disposition | dict[str, Disposition]] = {
    # ---- logging (KS library/utils.add_logging_arguments)
    "console_log_level": honoured("sets the level of Python logging (our progress output is printed)"),
    "console_log_file": refused("the console log is not written to a file here; redirect the output instead "
                                "(`... 2>&1 | tee train.log`)"),
    "console_log_simple": no_op("the console output is plain text already (no rich handler)"),
    # ---- model (add_sd_models_arguments)
    "v2": {"own": honoured(), "compat": refused("this family has no SD2 variant; drop --v2 (KS refuses it too)")},
    "v_parameterization": honoured("v-prediction; the family's own checks refuse it where the model cannot use it"),
    "pretrained_model_name_or_path": honoured("diffusers folder or single-file checkpoint; never downloads"),
    "tokenizer_cache_dir": no_op("tokenizers are read from the model folder or the shipped configs and never "
                                 "downloaded, so there is nothing to cache"),
    # ---- modelspec metadata (sai_model_spec.add_model_spec_arguments)
    **{f"metadata_{k}": honoured(f"written as modelspec.{k}") for k in (
        "title", "author", "description", "license", "tags", "usage_hint", "merged_from", "trigger_phrase",
        "preprocessor", "is_negative_embedding")},
    "metadata_thumbnail": honoured("an image file is embedded as a data URL in modelspec.thumbnail (KS)"),
    # ---- dataset group (add_dataset_arguments): the data engineer's area
    **{k: honoured() for k in (
        "train_data_dir", "shuffle_caption", "caption_extension", "keep_tokens", "keep_tokens_separator",
        "caption_prefix", "caption_suffix", "color_aug", "flip_aug", "random_crop", "resolution", "cache_latents",
        "cache_latents_to_disk", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale",
        "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "reg_data_dir")},
    "bucket_reso_steps": honoured("64 as KS, for every family"),
    **{k: honoured("see docs/datasets.md") for k in (
        "caption_separator", "caption_extention", "secondary_separator", "enable_wildcard", "debug_dataset",
        "vae_batch_size", "skip_cache_check", "resize_interpolation", "token_warmup_min", "token_warmup_step",
        "in_json", "dataset_repeats")},
    "cache_info": Disposition(NO_OP, "every image is scanned up front anyway (sizes and captions are read and "
                              "checked each run)", checked_elsewhere=True),
    "face_crop_aug_range": Disposition(REFUSED, "it needs face boxes in the image file names written by KS's "
                                       "face-detection tool; crop the images around the faces beforehand, or use "
                                       "--random_crop", checked_elsewhere=True),
    "dataset_class": Disposition(REFUSED, "custom dataset classes are not supported; describe the data with "
                                 "--dataset_config ds.toml (KS schema) or --in_json", checked_elsewhere=True),
    "alpha_mask": honoured("the image's alpha channel is the loss mask (with --masked_loss); cached with the latents"),
    # ---- training (add_training_arguments)
    "output_dir": honoured(),
    "output_name": honoured("unset: files are named as KS names them (last, at-stepNNNNNNNN, epoch-NNNNNN)"),
    **{k: _NO_UPLOAD for k in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
                               "huggingface_token", "huggingface_repo_visibility", "save_state_to_huggingface",
                               "resume_from_huggingface", "async_upload")},
    "save_precision": honoured(),
    "save_every_n_epochs": honoured(),
    "save_every_n_steps": honoured("a step save at the last step too, as KS"),
    "save_n_epoch_ratio": honoured("saves every floor(epochs / N) epochs (at least 1), as KS"),
    "save_last_n_epochs": honoured(),
    "save_last_n_epochs_state": honoured("state folders kept separately from the LoRA files, as KS"),
    "save_last_n_steps": honoured(),
    "save_last_n_steps_state": honoured("state folders kept separately from the LoRA files, as KS"),
    "save_state": honoured("our own state folder (exact resume), with KS's folder names"),
    "save_state_on_train_end": honoured(),
    "resume": honoured("a state folder written by this trainer (KS's accelerate folders are a different format)"),
    "train_batch_size": honoured(),
    "max_token_length": honoured(),
    "mem_eff_attn": no_op("PyTorch scaled-dot-product attention (memory-efficient) is always used"),
    "torch_compile": honoured("the denoiser step is compiled (library/speed.py)"),
    "dynamo_backend": honoured("backends that cannot run here are refused before models load (library/speed.py)"),
    "xformers": honoured("needs xformers installed; PyTorch SDPA otherwise"),
    "sdpa": no_op("PyTorch scaled-dot-product attention is always used"),
    "vae": honoured(),
    "max_train_steps": honoured(),
    "max_train_epochs": honoured(),
    "max_data_loader_n_workers": honoured("KS's default 8; see docs/training.md"),
    "persistent_data_loader_workers": no_op("data-loader workers are started per epoch; the epoch's data order "
                                            "is fixed up front"),
    "seed": honoured("a random seed is drawn, printed and written to ss_seed when none is given (KS)"),
    "gradient_checkpointing": honoured(),
    "gradient_accumulation_steps": honoured(),
    "mixed_precision": honoured(),
    "full_fp16": honoured("see docs/memory.md"),
    "full_bf16": honoured("see docs/memory.md"),
    "fp8_base": honoured("see docs/memory.md"),
    "ddp_timeout": honoured("the process-group timeout in minutes"),
    "ddp_gradient_as_bucket_view": _NO_DDP_WRAP,
    "ddp_static_graph": _NO_DDP_WRAP,
    "clip_skip": {"own": honoured(), "compat": no_op("this family ignores --clip_skip, as in KS (which warns too)")},
    "logging_dir": honoured(),
    "log_with": honoured(),
    "log_prefix": honoured(),
    "log_tracker_name": honoured(),
    "wandb_run_name": honoured(),
    "log_tracker_config": honoured("a TOML file of tracker init arguments, as KS"),
    "wandb_api_key": honoured("logs in to wandb with the key"),
    "log_config": honoured("the run's flags go to the tracker (paths and keys left out, as KS)"),
    **{k: honoured() for k in (
        "noise_offset", "noise_offset_random_strength", "multires_noise_iterations", "ip_noise_gamma",
        "ip_noise_gamma_random_strength", "multires_noise_discount", "adaptive_noise_scale", "zero_terminal_snr",
        "min_timestep", "max_timestep", "loss_type", "huber_schedule", "huber_c", "huber_scale", "min_snr_gamma",
        "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "debiased_estimation_loss", "prior_loss_weight")},
    "lowram": no_op("models load straight to their device"),
    "highvram": no_op("nothing is offloaded to save VRAM here, so there is nothing to keep on the GPU"),
    "sample_every_n_steps": honoured(),
    "sample_at_first": honoured("samples before the first step"),
    "sample_every_n_epochs": honoured(),
    "sample_prompts": honoured(),
    "sample_sampler": honoured(),
    "config_file": honoured("TOML values are type-checked like the command line"),
    "output_config": honoured("writes --config_file and exits; refuses an existing file (--overwrite replaces it, never a run input)"),
    # ---- masked loss (add_masked_loss_arguments)
    "conditioning_data_dir": honoured("mask images for --masked_loss, one per training image"),
    "masked_loss": honoured("renormalised by mask area by default (--masked_loss_normalization none is KS's mean)"),
    # ---- deepspeed (deepspeed_utils.add_deepspeed_arguments)
    **{k: _NO_DEEPSPEED for k in ("deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                                  "offload_param_device", "offload_param_nvme_path", "zero3_init_flag",
                                  "zero3_save_16bit_model", "fp16_master_weights_and_gradients")},
    # ---- optimizer (add_optimizer_arguments)
    **{k: honoured() for k in (
        "optimizer_type", "use_8bit_adam", "use_lion_optimizer", "max_grad_norm", "optimizer_args",
        "lr_scheduler_type", "lr_scheduler_args", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps",
        "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio")},
    "learning_rate": honoured("KS's default 2e-6 (LoRA recipes give 1e-4)"),
    "fused_backward_pass": no_op("KS's LoRA trainers do not use it either (it is for full fine-tuning)"),
    # ---- config (config_util.add_config_arguments)
    "dataset_config": honoured(),
    # ---- custom_train_functions
    "weighted_captions": refused("caption weights like (word:1.2) are not parsed here: the text would be trained "
                                 "literally; remove the weights from the captions and drop the flag"),
    # ---- train_network.py
    "cpu_offload_checkpointing": honoured("see docs/memory.md"),
    "no_metadata": honoured("only the minimum ss_* keys and modelspec.* are written, as KS"),
    "save_model_as": refused("only safetensors is written (ckpt/pt are pickles); use --save_model_as safetensors"),
    "unet_lr": honoured(),
    "text_encoder_lr": honoured(),
    "fp8_base_unet": honoured("see docs/memory.md"),
    "network_weights": honoured(),
    "network_module": honoured("networks.lora when unset"),
    "network_dim": honoured(),
    "network_alpha": honoured(),
    "network_dropout": honoured(),
    "network_args": honoured("conv_dim, conv_alpha, rank_dropout, module_dropout, ... (see docs/lora-format.md)"),
    "network_train_unet_only": honoured(),
    "network_train_text_encoder_only": honoured(),
    "training_comment": honoured("ss_training_comment"),
    "dim_from_weights": honoured(),
    "scale_weight_norms": honoured("KS's max-norm, with keys_scaled / average key norm logged"),
    "base_weights": honoured("merged into the frozen model before training, as KS"),
    "base_weights_multiplier": honoured(),
    "no_half_vae": honoured("without it the VAE runs in the mixed-precision dtype (KS); an fp16 VAE whose config "
                            "says force_upcast (SDXL 1.0) stays fp32 anyway"),
    "skip_until_initial_step": refused("--resume continues exactly where a saved state stopped; use --save_state "
                                       "and --resume STATE_FOLDER"),
    "initial_epoch": refused("--resume continues exactly where a saved state stopped; use --save_state and "
                             "--resume STATE_FOLDER"),
    "initial_step": refused("--resume continues exactly where a saved state stopped; use --save_state and "
                            "--resume STATE_FOLDER"),
    "validation_seed": honoured(),
    "validation_split": honoured(),
    "validate_every_n_steps": honoured(),
    "validate_every_n_epochs": honoured(),
    "max_validation_steps": honoured("validates on the first N validation batches only (fixed noise and levels)"),
    # ---- sdxl / sd3 (add_dit_training_arguments, sdxl/sd3 training arguments)
    "cache_text_encoder_outputs": honoured(),
    "cache_text_encoder_outputs_to_disk": honoured(),
    "disable_mmap_load_safetensors": no_op("checkpoints are read the same way either way; only KS's load speed "
                                           "on some file systems differs"),
    "text_encoder_batch_size": no_op("text-encoder outputs are cached one batch at a time; memory use only"),
    "weighting_scheme": honoured(),
    "logit_mean": honoured(),
    "logit_std": honoured(),
    "mode_scale": honoured(),
    "blocks_to_swap": Disposition(NO_OP, "CPU runs have nothing to swap (one note); on CUDA it is refused until block swapping is built", checked_elsewhere=True),
    "clip_l": honoured(),
    "clip_g": honoured(),
    "t5xxl": honoured(),
    "save_clip": no_op("a LoRA run saves no text encoders (KS's LoRA trainer does not either)"),
    "save_t5xxl": no_op("a LoRA run saves no text encoders (KS's LoRA trainer does not either)"),
    "t5xxl_device": refused("T5 runs on the training device; to free it, use --cache_text_encoder_outputs"),
    "t5xxl_dtype": honoured("T5 runs in this dtype (KS marks its flag as not working)"),
    "t5xxl_max_token_length": honoured(),
    "apply_lg_attn_mask": honoured("padding masks reach the CLIP encoders, as in KS"),
    "apply_t5_attn_mask": honoured("the padding mask reaches T5, as in KS"),
    "clip_l_dropout_rate": honoured(),
    "clip_g_dropout_rate": honoured(),
    "t5_dropout_rate": honoured(),
    "pos_emb_random_crop_rate": honoured("in training steps only"),
    "enable_scaled_pos_embed": Disposition(REFUSED, "KS's per-resolution rescaled position tables are not built; train without it", checked_elsewhere=True),
    "training_shift": honoured("an alias of --timestep_shift"),
}


def _pick(flag: str, compat: bool) -> Disposition | None:
    entry = DISPOSITIONS.get(flag)
    if isinstance(entry, dict):
        return entry["compat" if compat else "own"]
    return entry


def disposition(flag: str, family: str) -> Disposition | None:
    return _pick(flag, flag in compat_flags(family))


@functools.lru_cache(maxsize=None)
def compat_flags(family: str) -> frozenset[str]:
    """The flags only this module adds to the family's parser (KS flags no group of ours defines)."""
    from library import train_util

    return frozenset(getattr(train_util.setup_parser(family), "ks_compat_flags", ()))


# KS flags that no other group of ours defines: added here with KS's type, default and choices (refused or no-op).
_DEEPSPEED_CHOICES = [None, "cpu", "nvme"]
KS_ONLY_FLAGS: dict[str, dict[str, Any]] = {
    "console_log_file": dict(type=str, default=None),
    "console_log_simple": dict(action="store_true"),
    "v2": dict(action="store_true"),
    "clip_skip": dict(type=int, default=None),
    "tokenizer_cache_dir": dict(type=str, default=None),
    "huggingface_repo_id": dict(type=str, default=None),
    "huggingface_repo_type": dict(type=str, default=None),
    "huggingface_path_in_repo": dict(type=str, default=None),
    "huggingface_token": dict(type=str, default=None),
    "huggingface_repo_visibility": dict(type=str, default=None),
    "save_state_to_huggingface": dict(action="store_true"),
    "resume_from_huggingface": dict(action="store_true"),
    "async_upload": dict(action="store_true"),
    "mem_eff_attn": dict(action="store_true"),
    "ddp_gradient_as_bucket_view": dict(action="store_true"),
    "ddp_static_graph": dict(action="store_true"),
    "highvram": dict(action="store_true"),
    "deepspeed": dict(action="store_true"),
    "zero_stage": dict(type=int, default=2, choices=[0, 1, 2, 3]),
    "offload_optimizer_device": dict(type=str, default=None, choices=_DEEPSPEED_CHOICES),
    "offload_optimizer_nvme_path": dict(type=str, default=None),
    "offload_param_device": dict(type=str, default=None, choices=_DEEPSPEED_CHOICES),
    "offload_param_nvme_path": dict(type=str, default=None),
    "zero3_init_flag": dict(action="store_true"),
    "zero3_save_16bit_model": dict(action="store_true"),
    "fp16_master_weights_and_gradients": dict(action="store_true"),
    "weighted_captions": dict(action="store_true"),
    "skip_until_initial_step": dict(action="store_true"),
    "initial_epoch": dict(type=int, default=None),
    "initial_step": dict(type=int, default=None),
}
# KS flags of only some scripts (SDXL / SD3 model flags) are defined by those families' own flag groups
# (library/families/*.py add_arguments); their dispositions are here like every other.


def add_arguments(parser: argparse.ArgumentParser, family: str) -> None:
    """The KS flags no other group defines; every refused or no-op flag gets its disposition as help."""
    g = parser.add_argument_group("kohya sd-scripts compatibility", "see docs/kohya-compat.md")
    added = []
    for flag, kwargs in KS_ONLY_FLAGS.items():
        if f"--{flag}" not in parser._option_string_actions:
            g.add_argument(f"--{flag}", **kwargs)
            added.append(flag)
    parser.ks_compat_flags = tuple(added)
    for action in parser._actions:
        flag = action.option_strings[0].lstrip("-") if action.option_strings else None
        entry = _pick(flag, flag in added)
        if entry is not None and entry.kind in (REFUSED, NO_OP):
            action.help = f"{entry.kind}: {entry.text}".replace("%", "%%")


def _defaults(parser: argparse.ArgumentParser) -> dict[str, Any]:
    return {a.dest: a.default for a in parser._actions if a.option_strings}


def check(args: argparse.Namespace, family: str, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Refuse the refused KS flags that are set (not at KS's default); print one note per set no-op flag.

    Returns the notes printed. Runs before any model loads."""
    from library import train_util

    parser = parser or train_util.setup_parser(family)
    defaults = _defaults(parser)
    added = set(getattr(parser, "ks_compat_flags", ()))
    notes = []
    for flag in DISPOSITIONS:
        d = _pick(flag, flag in added)
        if d is None or d.kind not in (REFUSED, NO_OP) or d.checked_elsewhere or flag not in defaults:
            continue
        value = getattr(args, flag, defaults[flag])
        if value == defaults[flag]:
            continue
        if d.kind == REFUSED:
            if flag == "save_model_as" and value == "safetensors":
                continue
            raise UserError(f"--{flag}: {d.text}")
        notes.append(f"note: --{flag} has no effect here: {d.text}")
    for note in notes:
        print(note)
    return notes


# ----------------------------------------------------------------------------------------------------------------
# docs/kohya-compat.md
# ----------------------------------------------------------------------------------------------------------------
def ks_flags() -> dict[str, list[dict[str, Any]]]:
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)["scripts"]


def markdown() -> str:
    """The compatibility table of every KS flag (from the KS inventory and DISPOSITIONS)."""
    from library.families import all_families

    scripts = ks_flags()
    order: list[str] = []
    where: dict[str, list[str]] = {}
    script_of = {f.name: f.entry_script for f in all_families() if f.entry_script in scripts}
    for family, script in script_of.items():
        for entry in scripts[script]:
            name = entry["flags"][0].lstrip("-")
            if name not in where:
                order.append(name)
                where[name] = []
            where[name].append(family)
    lines = [
        "# kohya sd-scripts flags: what each one does here",
        "",
        "Generated by `python -m library.ks_compat --write` from `library/ks_compat.py` (the disposition of each "
        "flag) and `tests/fixtures/ks_flags.json` (KS's own flags, read from its source by "
        "`tools/ks_flag_inventory.py`); a test fails when this file is out of date.",
        "",
        "* **honoured**: does what it does in KS (the note says how, where it matters).",
        "* **refused**: accepted (`--help` lists it; a TOML with KS's default value loads), but any other value stops "
        "the run before a model loads, saying why and what to use instead.",
        "* **no-op**: accepted; a non-default value prints one note. Only where it changes nothing here.",
        "* **pending**: being implemented right now by another change.",
        "",
        "Every flag has KS's name, type, default and choices (tests/test_ks_compat.py checks them against KS's list).",
        "",
        f"KS commit: `{_commit()}`.",
        "",
        "| flag | scripts | what we do |",
        "|---|---|---|",
    ]
    for name in order:
        families = where[name]
        cells = []
        seen = []
        for family in families:
            d = disposition(name, family)
            text = "**missing**" if d is None else f"{d.kind}" + (f": {d.text}" if d.text else "")
            if (text, family) not in seen:
                seen.append((text, family))
        texts = {}
        for text, family in seen:
            texts.setdefault(text, []).append(family)
        if len(texts) == 1:
            cells.append(next(iter(texts)))
        else:
            cells.append("; ".join(f"{'/'.join(f)}: {t}" for t, f in texts.items()))
        scope = "all" if len(families) == len(script_of) else ", ".join(script_of[f] for f in families)
        lines.append(f"| `--{name}` | {scope} | {cells[0].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)["source"]["commit"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = markdown()
    if "--write" in argv:
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
