"""KS `ss_*` metadata for LoRA files: what a LoRA was trained from and how.

Values are strings (safetensors metadata is str -> str). The loss and timestep options come from
`LossConfig.metadata()`, the dataset summary from the data group.
"""
from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from library.families import get_family


def training_metadata(args: argparse.Namespace, family: str, *, num_train_images: int, num_reg_images: int,
                      num_batches_per_epoch: int, num_epochs: int, started_at: float,
                      loss_metadata: dict[str, str], dataset_metadata: dict[str, Any]) -> dict[str, str]:
    base_version = get_family(family).base_model_version(args)
    md: dict[str, Any] = {
        "ss_session_id": uuid.uuid4().int % (2**31),
        "ss_training_started_at": started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_network_args": json.dumps(dict(a.split("=", 1) for a in (args.network_args or []) if "=" in a)),
        "ss_scale_weight_norms": getattr(args, "scale_weight_norms", None),
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": args.full_fp16,
        "ss_fp8_base": getattr(args, "fp8_base", False),
        "ss_fp8_base_unet": getattr(args, "fp8_base_unet", False),
        "ss_v2": getattr(args, "v2", False),
        "ss_base_model_version": base_version,
        "ss_clip_skip": getattr(args, "clip_skip", None),
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": args.cache_latents,
        "ss_seed": args.seed,
        "ss_optimizer": args.optimizer_type + (f"({','.join(args.optimizer_args)})" if args.optimizer_args else ""),
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_v_parameterization": args.v_parameterization,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_training_comment": args.training_comment,
        "ss_sd_model_name": args.pretrained_model_name_or_path,
        "ss_vae_name": args.vae,
        "ss_resolution": args.resolution,
        "ss_enable_bucket": args.enable_bucket,
        "ss_min_bucket_reso": args.min_bucket_reso,
        "ss_max_bucket_reso": args.max_bucket_reso,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_shuffle_caption": args.shuffle_caption,
        "ss_keep_tokens": args.keep_tokens,
        "ss_flip_aug": args.flip_aug,
        "ss_color_aug": args.color_aug,
        "ss_random_crop": args.random_crop,
    }
    md.update(get_family(family).extra_metadata(args))
    md.update(loss_metadata)
    md.update(dataset_metadata)
    return {k: (v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            for k, v in md.items() if v is not None}


def finish_metadata(metadata: dict[str, str], step: int, epoch: int) -> dict[str, str]:
    out = dict(metadata)
    out.update({"ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())})
    return out
