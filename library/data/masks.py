"""Loss masks (KS ``--masked_loss`` / ``--alpha_mask``): where they come from, how they follow the image, and the
flag rules.

* ``conditioning_data_dir`` (a subset key, or ``--conditioning_data_dir`` for the ``--train_data_dir`` subsets):
  beside each image ``<stem>.<ext>`` a mask image with the same stem (any image extension) in that folder; its red
  channel / 255 is the mask (KS ``apply_masked_loss``: R channel, [-1, 1] -> [0, 1]). Needs ``--masked_loss``
  (KS: the key is only accepted then). Every image needs its mask, of the same size (KS asserts both).
* ``alpha_mask`` (a subset key, or ``--alpha_mask``): the image's alpha channel / 255; images without alpha give
  all ones (KS). As in KS, alpha masks apply whenever present, with or without ``--masked_loss``.

A mask follows its image through resize, crop and flip (KS crops conditioning images at the centre only; here the
image's own crop). The batch key ``masks`` holds [B, 1, H, W] in [0, 1] at the image size, or at the latent size
when latents are cached (the mask is cached with the latent, area-averaged over each latent pixel's 8×8 image
pixels, which is what the loss does with a full-size mask anyway: library/losses.mask_like). Items without a mask
in a batch with masks get ones (KS).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.folders import list_images
from library.errors import UserError

ALPHA = "alpha"  # ImageItem.mask_source for alpha-channel masks; otherwise the mask file's path (or None)


def mask_files(conditioning_dir: str, image_paths: list[str], where: str) -> dict[str, str]:
    """{image path: mask path} by stem; a missing mask is an error naming the images, extra masks a warning."""
    if not os.path.isdir(conditioning_dir):
        raise UserError(f"{where}: conditioning_data_dir '{conditioning_dir}' is not a folder")
    by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in list_images(conditioning_dir)}
    found, missing = {}, []
    for path in image_paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in by_stem:
            found[path] = by_stem[stem]
        else:
            missing.append(os.path.basename(path))
    if missing:
        raise UserError(f"{where}: {len(missing)} image(s) have no mask of the same name in conditioning_data_dir "
                        f"'{conditioning_dir}': {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; add "
                        "them (a mask may be any image format; its red channel is used)")
    return found


def check_mask_size(mask_path: str, image_size_wh: tuple[int, int]) -> None:
    with Image.open(mask_path) as mask:
        mask = ImageOps.exif_transpose(mask)
        size = mask.size
    if tuple(size) != tuple(image_size_wh):
        raise UserError(f"mask '{mask_path}' is {size[0]}x{size[1]} but its image is {image_size_wh[0]}x"
                        f"{image_size_wh[1]}; a mask must have its image's size (KS rule)")


def load_mask(source: str, image_path: str) -> Image.Image:
    """The mask as an 8-bit 'L' image at the image's full size: alpha channel (ones without alpha) or the red
    channel of the mask file."""
    if source == ALPHA:
        with Image.open(image_path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                return image.convert("RGBA").getchannel("A")
            return Image.new("L", image.size, 255)
    with Image.open(source) as mask:
        mask = ImageOps.exif_transpose(mask)
        return mask.convert("RGB").getchannel("R")


def mask_pixels(mask: Image.Image, resized_wh: tuple[int, int], bucket_wh: tuple[int, int],
                crop_left_top: tuple[int, int], flip: bool) -> np.ndarray:
    """The mask through the image's geometry (bilinear resize: a mask is a weight, not a picture) -> float32
    [H, W] in [0, 1]."""
    if mask.size != tuple(resized_wh):
        mask = mask.resize(tuple(resized_wh), Image.Resampling.BILINEAR)
    left, top = crop_left_top
    if mask.size != tuple(bucket_wh):
        mask = mask.crop((left, top, left + bucket_wh[0], top + bucket_wh[1]))
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return np.ascontiguousarray(array[:, ::-1] if flip else array)


def to_latent_size(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[H, W] (or [1, H, W]) -> [1, h, w] by area averaging (what the loss does to a full-size mask)."""
    mask = mask.reshape(1, 1, *mask.shape[-2:]).float()
    return torch.nn.functional.interpolate(mask, size=tuple(latent_hw), mode="area")[0]


def stack_masks(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    """[B, 1, H, W] from per-item [1, H, W] masks; None entries become ones (KS); None when no item has one."""
    if all(m is None for m in masks):
        return None
    shape = next(m for m in masks if m is not None).shape
    return torch.stack([m if m is not None else torch.ones(shape) for m in masks])


def check_mask_options(masked_loss: bool, masked_loss_normalization: str, has_conditioning: bool,
                       has_alpha: bool) -> None:
    """The flag rules, before any model loads."""
    if has_conditioning and not masked_loss:
        raise UserError("conditioning_data_dir: mask images are used only with --masked_loss (KS rule); add "
                        "--masked_loss or remove conditioning_data_dir")
    if masked_loss and not (has_conditioning or has_alpha):
        raise UserError("--masked_loss: no subset has masks; set conditioning_data_dir (mask images of the same "
                        "names) or alpha_mask = true in the dataset TOML, or --conditioning_data_dir / --alpha_mask")
    if masked_loss_normalization != "area" and not (has_conditioning or has_alpha):
        raise UserError(f"--masked_loss_normalization {masked_loss_normalization}: has no effect without masks; "
                        "remove it")
