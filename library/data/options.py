"""Data flags as plain values: `DatasetOptions`, named and defaulted exactly as the kohya sd-scripts (KS) flags.

Components below `library/data/` never see the argparse namespace; `DatasetOptions.from_args` is the one bridge.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from library.errors import UserError


@dataclass
class DatasetOptions:
    """The KS data flags (names and defaults as KS `train_util.add_dataset_arguments`).

    `resolution` is KS "width,height" ("512" means 512x512); `bucket_reso_steps` is 64 as KS (the SDXL recipe
    passes 32). `seed` None means 0 for the data order (the loop should fill in the run's seed)."""
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    prior_loss_weight: float = 1.0
    dataset_config: str | None = None
    resolution: str | int | tuple[int, int] | None = None
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens_separator: str = ""
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    train_batch_size: int = 1
    max_data_loader_n_workers: int = 8
    seed: int | None = None
    validation_split: float = 0.0          # KS: share of each --train_data_dir subset held out for validation
    validation_seed: int | None = None     # KS: the shuffle seed of that split (default: --seed)
    # Not dataset-shape flags, but they decide which augmentations are allowed (checked before any model loads).
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace | Any) -> "DatasetOptions":
        """Read every field from `args` by name; a missing or None attribute keeps the KS default
        (except the fields whose KS default is None, which stay None)."""
        values = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                values[f.name] = value
        return cls(**values)

    @property
    def data_seed(self) -> int:
        return 0 if self.seed is None else int(self.seed)


def parse_resolution(value: str | int | tuple[int, int] | list[int] | None,
                     flag: str = "--resolution") -> tuple[int, int]:
    """KS resolution "W" or "W,H" (also an int or a 2-sequence) -> (width, height)."""
    if value is None:
        raise UserError(f"{flag}: required; give the training size, e.g. --resolution 512 or --resolution 512,768 "
                        "(width,height), or `resolution` in the dataset TOML")
    if isinstance(value, bool):
        raise UserError(f"{flag}: expected an integer or 'width,height', got {value!r}")
    if isinstance(value, int):
        parts: list[Any] = [value]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise UserError(f"{flag}: expected an integer or 'width,height', got {value!r}")
    try:
        sizes = [int(p) for p in parts]
        if any(isinstance(p, (bool, float)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{flag}: expected an integer or 'width,height', got {value!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise UserError(f"{flag}: expected one or two positive integers (width,height), got {value!r}")
    return sizes[0], sizes[1]
