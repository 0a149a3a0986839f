"""Warnings about data that trains, but not as the user may think: each kind once, with a count and an example.

* files beside the images that are not used: other image types (an animated GIF, TIFF, HEIC...) and symlinks
  whose target is missing;
* tiny images that are upscaled 2x or more to fill their bucket;
* extreme aspect ratios of which less than half the image survives the crop;
* captions longer than the text encoder's token limit (truncated), once the tokenizer is known.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from library.data.folders import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

UNUSED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".ico", ".psd")
UPSCALE_WARNING = 2.0        # resized / original side
KEPT_AREA_WARNING = 0.5      # bucket area / resized area


def _once(kind: str, examples: list[str], total: int, advice: str) -> None:
    if examples:
        shown = ", ".join(f"'{e}'" for e in examples[:3]) + (", ..." if len(examples) > 3 else "")
        logger.warning("%d of %d images %s (%s); %s", len(examples), total, kind, shown, advice)


def warn_about_files(image_dirs: list[str]) -> None:
    """Unused image types and dangling symlinks in the image folders."""
    other_types, dangling = [], []
    for folder in dict.fromkeys(image_dirs):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            lower = name.lower()
            if os.path.islink(path) and not os.path.exists(path):
                dangling.append(path)
            elif lower.endswith(UNUSED_IMAGE_EXTENSIONS):
                other_types.append(path)
    if other_types:
        logger.warning("%d file(s) in the image folders are not used: only %s are read (e.g. '%s'); convert them "
                       "(an animated GIF trains as its first frame once saved as .png)", len(other_types),
                       "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS), other_types[0])
    if dangling:
        logger.warning("%d symlink(s) in the image folders point to nothing and are skipped (e.g. '%s' -> '%s')",
                       len(dangling), dangling[0], os.readlink(dangling[0]))


def warn_about_geometry(items: list[Any]) -> None:
    """Tiny images upscaled, extreme aspect ratios cropped. `items` have original_size_hw, resized_wh, bucket_wh."""
    upscaled, cropped = [], []
    for item in items:
        height, width = item.original_size_hw
        scale = item.resized_wh[0] / max(width, 1)
        if scale >= UPSCALE_WARNING:
            upscaled.append(f"{os.path.basename(item.path)} {width}x{height} x{scale:.0f}")
        kept = item.bucket_wh[0] * item.bucket_wh[1] / max(item.resized_wh[0] * item.resized_wh[1], 1)
        if kept < KEPT_AREA_WARNING:
            cropped.append(f"{os.path.basename(item.path)} {width}x{height}: {kept:.0%} kept")
    _once("are upscaled 2x or more to fill their bucket", upscaled, len(items),
          "they train blurry; use larger images or a smaller --resolution")
    _once("lose more than half of the picture to the crop", cropped, len(items),
          "crop them yourself, or use --enable_bucket with a wider --min_bucket_reso/--max_bucket_reso range")


def warn_about_long_captions(captions: dict[str, str], tokenizer: Any, max_tokens: int) -> None:
    """Captions (by image path) with more tokens than the text encoder reads; they are cut at `max_tokens`."""
    from transformers.utils import logging as hf_logging

    long = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' own "longer than the maximum" note: this warning replaces it
    try:
        for path, caption in captions.items():
            count = len(tokenizer.tokenize(caption or ""))
            if count > max_tokens:
                long.append(f"{os.path.basename(path)}: {count} tokens")
    finally:
        hf_logging.set_verbosity(verbosity)
    _once(f"have captions longer than the text encoder's {max_tokens} tokens, which are cut off", long,
          len(captions), "shorten them, or use --max_token_length 150 or 225 where the trainer has it")
