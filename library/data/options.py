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
    in_json: str | None = None             # KS fine-tuning metadata (captions/tags per image) for --train_data_dir
    dataset_repeats: int = 1               # KS: num_repeats of subsets that do not set it (--in_json, TOML)
    prior_loss_weight: float = 1.0
    dataset_config: str | None = None
    resolution: str | int | tuple[int, int] | None = None
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".caption"
    caption_extention: str | None = None   # KS's misspelled alias; wins over caption_extension when given (KS)
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    resize_interpolation: str | None = None
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    train_batch_size: int = 1
    max_data_loader_n_workers: int = 8
    seed: int | None = None
    validation_split: float = 0.0          # KS: share of each --train_data_dir subset held out for validation
    validation_seed: int | None = None     # KS: the shuffle seed of that split (default: --seed)
    alpha_mask: bool = False               # KS: the alpha channel is the loss mask (library/data/masks.py)
    conditioning_data_dir: str | None = None  # KS: mask images of the same names, for the --train_data_dir subsets
    masked_loss: bool = False              # KS training flag: needed by conditioning_data_dir
    masked_loss_normalization: str = "area"
    # Not dataset-shape flags, but they decide which augmentations are allowed (checked before any model loads).
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    skip_cache_check: bool = False         # KS: reuse a cache file that exists without checking what it holds
    vae_batch_size: int = 1                # KS: images per VAE call when caching latents
    # KS flags refused or noted by `check` (see docs/datasets.md).
    face_crop_aug_range: str | None = None
    dataset_class: str | None = None
    cache_info: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace | Any) -> "DatasetOptions":
        """Read every field from `args` by name; a missing or None attribute keeps the KS default
        (except the fields whose KS default is None, which stay None)."""
        values = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                values[f.name] = value
        if values.get("caption_extention") is not None:  # KS prepare_dataset_args: the old spelling wins
            values["caption_extension"] = values["caption_extention"]
        return cls(**values)

    def check(self) -> None:
        """KS data flags this trainer refuses or notes, checked before any file is read."""
        if self.face_crop_aug_range:
            raise UserError("--face_crop_aug_range: not supported here: it needs face boxes in the image file names "
                            "written by KS's face-detection tool; crop the images around the faces beforehand, or "
                            "use --random_crop")
        if self.dataset_class:
            raise UserError(f"--dataset_class {self.dataset_class}: custom dataset classes are not supported here; "
                            "describe the data with --dataset_config ds.toml (KS schema) or --in_json")
        if isinstance(self.vae_batch_size, bool) or not isinstance(self.vae_batch_size, int) \
                or self.vae_batch_size < 1:
            raise UserError(f"--vae_batch_size: must be an integer >= 1, got {self.vae_batch_size!r}")
        if self.cache_info:
            note_once("--cache_info", "every image is scanned up front anyway (sizes and captions are read and "
                      "checked each run)")

    @property
    def data_seed(self) -> int:
        return 0 if self.seed is None else int(self.seed)


_NOTED: set[str] = set()


def note_once(what: str, why: str) -> None:
    """Print `note: WHAT has no effect here: WHY` once per process (KS flags and keys that change nothing)."""
    if what not in _NOTED:
        _NOTED.add(what)
        print(f"note: {what} has no effect here: {why}")


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
