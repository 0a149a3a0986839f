"""LoRA-file metadata as KS writes it: the `ss_*` training keys (KS train_network.py), the `modelspec.*` keys
(KS library/sai_model_spec.py, SAI ModelSpec 1.0.1), and the model hashes KS computes (`model_hash`,
`calculate_sha256` in KS library/train_util.py).

Values are strings (safetensors metadata is str -> str), formatted as KS formats them: `str(value)` of the Python
value, so an unset option is "None", a flag "True"/"False" and `ss_resolution` the tuple "(512, 512)". Our own
extra keys (every loss and timestep option, from `LossConfig.metadata()`) follow the same rule. `--no_metadata`
keeps only KS's minimum keys and the modelspec block.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import mimetypes
import os
import time
import uuid
from typing import Any

from library import file_hashes
from library.families import get_family

# KS SS_METADATA_MINIMUM_KEYS: what --no_metadata still writes (what a loader needs to apply the LoRA).
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
MODELSPEC_FIELDS = ("title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                    "trigger_phrase", "preprocessor", "is_negative_embedding")


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """KS `sai_model_spec.add_model_spec_arguments` and `--no_metadata`."""
    g = parser.add_argument_group("metadata", "modelspec.* keys of the saved LoRA (SAI ModelSpec, as KS)")
    for name in MODELSPEC_FIELDS:
        g.add_argument(f"--metadata_{name}", type=str, default=None,
                       help=f"modelspec.{name}" + (" (default: --output_name)" if name == "title" else "")
                       + (" (an image file, embedded as a data URL)" if name == "thumbnail" else ""))
    g.add_argument("--no_metadata", action="store_true",
                   help="write only the minimum ss_* keys (and modelspec.*), as KS")


# ----------------------------------------------------------------------------------------------------------------
# Model hashes (KS train_util.model_hash / calculate_sha256: the A1111 old and new checkpoint hashes)
# ----------------------------------------------------------------------------------------------------------------
def model_hash(path: str) -> str:
    """A1111's old hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits. A folder gives KS's "IsADirectory"."""
    if os.path.isdir(path):
        return "IsADirectory"
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def calculate_sha256(path: str) -> str:
    """A1111's new hash: sha256 of the whole file (remembered between runs, library/file_hashes.py). A folder gives
    KS's "IsADirectory"."""
    if os.path.isdir(path):
        return "IsADirectory"
    return file_hashes.cached_sha256(path)


def prefetch_model_hashes(args: argparse.Namespace) -> None:
    """Start hashing the files `training_metadata` will hash, in the background, before the models load."""
    if args.no_metadata:
        return
    for path in (args.pretrained_model_name_or_path, args.vae):
        if path:
            file_hashes.prefetch(path)


# ----------------------------------------------------------------------------------------------------------------
# modelspec.*
# ----------------------------------------------------------------------------------------------------------------


def _data_url(path: str) -> str | None:
    if not os.path.isfile(path):
        print(f"note: --metadata_thumbnail {path} does not exist; no thumbnail written")
        return None
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def modelspec(args: argparse.Namespace, family: str, resolution: tuple[int, int] | None,
              timestamp: float) -> dict[str, str]:
    """The `modelspec.*` block KS writes into a LoRA (sai_model_spec.build_metadata with lora=True); the family
    entry gives the architecture (ARCH_*), the implementation (IMPL_*) and the default resolution."""
    entry = get_family(family)
    v_param = bool(args.v_parameterization)
    if resolution is None:
        resolution = (entry.default_resolution, entry.default_resolution)
    md: dict[str, Any] = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": (entry.modelspec_architecture(args) or entry.name) + "/lora",
        "modelspec.implementation": entry.modelspec_implementation,
        "modelspec.title": args.metadata_title if args.metadata_title is not None else (args.output_name or "last"),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_param else "epsilon",
    }
    for name in ("author", "description", "license", "tags"):
        if getattr(args, f"metadata_{name}", None) is not None:
            md[f"modelspec.{name}"] = getattr(args, f"metadata_{name}")
    if args.min_timestep is not None or args.max_timestep is not None:
        md["modelspec.timestep_range"] = f"{args.min_timestep or 0},{args.max_timestep if args.max_timestep is not None else 1000}"
    if getattr(args, "clip_skip", None) is not None:
        md["modelspec.encoder_layer"] = str(args.clip_skip)
    for name in ("usage_hint", "merged_from", "trigger_phrase", "preprocessor", "is_negative_embedding"):
        if getattr(args, f"metadata_{name}", None) is not None:
            md[f"modelspec.{name}"] = getattr(args, f"metadata_{name}")
    if getattr(args, "metadata_thumbnail", None):
        thumbnail = args.metadata_thumbnail
        thumbnail = thumbnail if thumbnail.startswith("data:") else _data_url(thumbnail)
        if thumbnail:
            md["modelspec.thumbnail"] = thumbnail
    md["modelspec.implementation_version"] = "lora-trainer/" + _our_version()
    return {k: str(v) for k, v in md.items()}


def _our_version() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# ss_*
# ----------------------------------------------------------------------------------------------------------------
def parse_resolution(resolution: str | None) -> tuple[int, int] | None:
    """KS prepare_dataset_args: '512' -> (512, 512), '512,768' -> (512, 768)."""
    if not resolution:
        return None
    sizes = tuple(int(r) for r in str(resolution).split(","))
    return (sizes[0], sizes[0]) if len(sizes) == 1 else sizes[:2]


def training_metadata(args: argparse.Namespace, family: str, *, num_train_images: int, num_reg_images: int,
                      num_batches_per_epoch: int, num_epochs: int, started_at: float,
                      loss_metadata: dict[str, Any], dataset_metadata: dict[str, Any], optimizer_name: str | None = None,
                      num_processes: int = 1, num_validation_images: int = 0) -> dict[str, str]:
    """Every key KS's train_network.py writes, formatted as KS formats it, then our loss and dataset keys."""
    v2 = bool(getattr(args, "v2", False))
    base_version = get_family(family).base_model_version(args)
    te_lr = args.text_encoder_lr
    if isinstance(te_lr, list):  # KS: one value -> that value; several -> the list
        te_lr = None if not te_lr else te_lr[0] if len(te_lr) == 1 else te_lr
    resolution = parse_resolution(args.resolution)
    md: dict[str, Any] = {
        "ss_session_id": uuid.uuid4().int % (2**31),
        "ss_training_started_at": started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": te_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_validation_images": num_validation_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module or "networks.lora",
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(getattr(args, "full_fp16", False)),
        "ss_v2": v2,
        "ss_base_model_version": base_version,
        "ss_clip_skip": getattr(args, "clip_skip", None),
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_lowram": bool(getattr(args, "lowram", False)),
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": _our_version(),
        "ss_optimizer": optimizer_name or args.optimizer_type,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": getattr(args, "face_crop_aug_range", None),
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": getattr(args, "scale_weight_norms", None),
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_fp8_base": bool(getattr(args, "fp8_base", False)),
        "ss_fp8_base_unet": bool(getattr(args, "fp8_base_unet", False)),
        "ss_validation_seed": args.validation_seed,
        "ss_validation_split": args.validation_split,
        "ss_max_validation_steps": getattr(args, "max_validation_steps", None),
        "ss_validate_every_n_epochs": args.validate_every_n_epochs,
        "ss_validate_every_n_steps": args.validate_every_n_steps,
        "ss_resize_interpolation": getattr(args, "resize_interpolation", None),
        # KS's summary of a dataset given by flags (not a --dataset_config TOML)
        "ss_batch_size_per_device": args.train_batch_size,
        "ss_total_batch_size": args.train_batch_size * num_processes * args.gradient_accumulation_steps,
        "ss_resolution": resolution,
        "ss_color_aug": bool(args.color_aug),
        "ss_flip_aug": bool(args.flip_aug),
        "ss_random_crop": bool(args.random_crop),
        "ss_shuffle_caption": bool(args.shuffle_caption),
        "ss_enable_bucket": bool(args.enable_bucket),
        "ss_bucket_no_upscale": bool(args.bucket_no_upscale),
        "ss_min_bucket_reso": args.min_bucket_reso,
        "ss_max_bucket_reso": args.max_bucket_reso,
        "ss_keep_tokens": args.keep_tokens,
        # ours beyond KS
        "ss_v_parameterization": args.v_parameterization,
        "ss_vae_name": None,
    }
    md.update(get_family(family).extra_metadata(args))  # KS's per-trainer update_metadata (SD3, Flux)
    if args.network_args:
        md["ss_network_args"] = json.dumps(dict(a.split("=", 1) for a in args.network_args if "=" in a))
    if args.pretrained_model_name_or_path:
        md.update(_model_file_keys(args.pretrained_model_name_or_path, "sd_model", args.no_metadata))
    md.pop("ss_vae_name")
    if args.vae:
        md.update(_model_file_keys(args.vae, "vae", args.no_metadata))
    md.update(loss_metadata)
    md.update(dataset_metadata)
    md["ss_seed"] = args.seed  # after the loss keys: the seed the run used, also when it was drawn at random
    return {k: (v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in md.items()}


def _model_file_keys(path: str, prefix: str, no_metadata: bool = False) -> dict[str, str]:
    """KS: the hashes of a local model file, and its file name only (no user paths in a shared file). With
    --no_metadata none of these keys is written, so the file is not hashed."""
    if not os.path.exists(path):
        return {f"ss_{prefix}_name": path}
    out = {f"ss_{prefix}_name": os.path.basename(os.path.normpath(path))}
    if not no_metadata:
        out[f"ss_{'sd_model' if prefix == 'sd_model' else 'vae'}_hash"] = model_hash(path)
        out[f"ss_new_{'sd_model' if prefix == 'sd_model' else 'vae'}_hash"] = calculate_sha256(path)
    return out


def finish_metadata(metadata: dict[str, str], step: int, epoch: int, *, no_metadata: bool = False,
                    modelspec_keys: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata of one save: KS's step, epoch and finish time; with --no_metadata only KS's minimum keys."""
    out = dict(metadata)
    out.update({"ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())})
    if no_metadata:
        out = {k: v for k, v in out.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
    for key, value in (modelspec_keys or {}).items():
        out.setdefault(key, value)  # what the family read from the model (e.g. the SD3.5 variant) wins
    return out
