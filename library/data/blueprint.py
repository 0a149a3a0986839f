"""The resolved data model: what each subset and dataset is, after folders / TOML / CLI precedence.

Plain frozen values; building them (folders.py, dataset_config.py) is separate from using them (dataset.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SubsetConfig:
    """One folder of images and how its captions and augmentations behave (KS `DreamBoothSubset`).

    `loss_weight` is 1.0 for training images and --prior_loss_weight for regularisation images (is_reg).
    `is_val` subsets are held out entirely for validation. A `metadata_file` subset (KS fine-tuning style) takes
    its images and captions from that JSON / JSONL file instead of listing `image_dir`.
    `token_warmup_step` is in steps, or a share of --max_train_steps when < 1 (KS)."""
    image_dir: str
    num_repeats: int = 1
    class_tokens: str | None = None
    is_reg: bool = False
    is_val: bool = False
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    resize_interpolation: str | None = None
    metadata_file: str | None = None
    loss_weight: float = 1.0
    # loss masks (library/data/masks.py): mask images of the same names, or the alpha channel
    conditioning_data_dir: str | None = None
    alpha_mask: bool = False


@dataclass(frozen=True)
class DatasetConfig:
    """One `[[datasets]]` entry: a resolution / bucket setting / batch size shared by its subsets.

    `resolution` is (width, height) as KS. `validation_split` holds out that share of each non-reg subset
    (KS `split_train_val`: shuffled with `validation_seed`, the last round(n * split) images)."""
    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
