"""Image files: the up-front scan (size + integrity), decoding to RGB, resize / crop / flip / colour augmentation.

cv2 is not available, so resizing uses PIL LANCZOS, which is antialiased when shrinking (what KS gets from
cv2 INTER_AREA) and sharp when enlarging (what KS uses PIL LANCZOS for).
EXIF orientation is applied (a phone photo stored sideways trains upright); KS ignores it.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from library.errors import UserError

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
WHITE = (255, 255, 255)

# PIL refuses images above ~179 Mpx as a "decompression bomb"; training images that large are legitimate.
Image.MAX_IMAGE_PIXELS = None


class BadImageError(Exception):
    """An image file that cannot be used; the message says why (the caller names the file)."""


@dataclass(frozen=True)
class ImageProbe:
    path: str
    width: int       # after EXIF orientation
    height: int
    file_size: int   # bytes, with mtime_ns: the identity a latent cache is checked against
    mtime_ns: int


def probe_image(path: str) -> ImageProbe:
    """Read the size and check the file is complete, without a full-resolution decode where avoidable:
    PNG: chunk CRCs (`verify`); JPEG: decode at 1/8 scale (still reads every scan, so truncation shows);
    others: full decode. Raises BadImageError."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise BadImageError(f"cannot be read ({e.strerror})") from None
    if stat.st_size == 0:
        raise BadImageError("is an empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            image_format = image.format
        if width <= 0 or height <= 0:
            raise BadImageError(f"has zero size ({width}x{height})")
        with Image.open(path) as image:
            if image_format == "PNG":
                image.verify()
            else:
                if image_format == "JPEG":
                    image.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
                image.load()
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, bad CRC, broken headers
        raise BadImageError(f"is truncated or corrupt ({e})") from None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return ImageProbe(path=path, width=width, height=height, file_size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def probe_images(paths: list[str], max_workers: int = 4) -> tuple[list[ImageProbe], list[tuple[str, str]]]:
    """Probe many files (PIL releases the GIL while decoding, so threads help): (good probes in input order,
    [(path, reason)] of bad ones)."""
    def one(path: str) -> ImageProbe | tuple[str, str]:
        try:
            return probe_image(path)
        except BadImageError as e:
            return path, str(e)

    workers = max(1, min(max_workers, len(paths)))
    if workers == 1:
        results = [one(p) for p in paths]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, paths))
    good = [r for r in results if isinstance(r, ImageProbe)]
    bad = [r for r in results if not isinstance(r, ImageProbe)]
    return good, bad


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent images (RGBA, LA, P or RGB/L with a transparent colour) are composited
    on white, so a transparent background trains as white rather than as whatever colour the hidden pixels
    happen to hold (KS drops alpha, exposing them)."""
    if has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bits instead of clipping
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image to RGB with EXIF orientation applied. A failure is a UserError naming the file (files
    were probed up front, so this only happens if a file changed during training)."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"image '{path}' could not be decoded ({e}); it changed or broke after the dataset "
                        "scan. Remove or replace it") from None


# KS --resize_interpolation names -> PIL filters. KS resizes with cv2 except for lanczos; without cv2, "area" is
# PIL's BOX (the pixel-area average cv2 INTER_AREA computes when shrinking), and PIL's bilinear / bicubic are
# antialiased when shrinking (cv2's are not).
RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX,
}


def resize_and_crop(image: Image.Image, resized_wh: tuple[int, int], bucket_wh: tuple[int, int],
                    crop_left_top: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """Resize to `resized_wh` (covering the bucket) with `interpolation` (a KS --resize_interpolation name; None:
    LANCZOS), then crop the bucket at `crop_left_top`."""
    if image.size != tuple(resized_wh):
        image = image.resize(tuple(resized_wh), RESAMPLING.get(interpolation, Image.Resampling.LANCZOS))
    left, top = crop_left_top
    if image.size != tuple(bucket_wh):
        image = image.crop((left, top, left + bucket_wh[0], top + bucket_wh[1]))
    return image


def color_augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """KS `color_aug`: with probability 0.33, either (half the time) a hue shift uniform in +-8 OpenCV hue units
    (of 180, i.e. +-16 degrees) or a gamma uniform in [0.95, 1.05]. KS raises raw 0..255 values to the gamma
    (which saturates); here the gamma applies to values normalised to [0, 1].
    `pixels`: uint8 [H, W, 3]. Always draws 3 uniforms so other streams do not shift."""
    apply, which, amount = rng.random(3)
    if apply > 0.33:
        return pixels
    if which > 0.5:
        hsv = np.asarray(Image.fromarray(pixels, "RGB").convert("HSV")).copy()
        shift = (amount * 16.0 - 8.0) / 180.0 * 256.0  # OpenCV hue units (0..180) -> PIL hue units (0..256)
        hsv[..., 0] = ((hsv[..., 0].astype(np.float64) + shift) % 256.0).astype(np.uint8)
        return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    gamma = 0.95 + 0.1 * amount
    return np.clip(255.0 * (pixels / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)


def pixels_to_tensor_batch(pixels: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images of one size -> FloatTensor [B, 3, H, W] in [-1, 1]: x / 127.5 - 1."""
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0
