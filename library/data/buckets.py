"""Aspect-ratio bucketing, the KS algorithm (library/model_util.py `make_bucket_resolutions`, library/train_util.py
`BucketManager.select_bucket`, `trim_and_resize_if_required`).

All sizes here are (width, height), as in KS; items elsewhere record (height, width) where SDXL wants it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
    """KS `make_bucket_resolutions`: for width = min_size, min_size + divisible, ... <= max_size, the height is
    min(max_size, floor(area / width / divisible) * divisible) with area = max_w * max_h, kept when
    >= min_size, in both orientations; plus the square floor(sqrt(area) / divisible) * divisible.
    Returns sorted (width, height) pairs; every bucket has width * height <= area."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    """Where an image goes: its bucket (w, h), the size it is resized to before cropping (w, h; covers the
    bucket), and the aspect-ratio error bucket_ar - image_ar."""
    bucket_wh: tuple[int, int]
    resized_wh: tuple[int, int]
    ar_error: float


class BucketSelector:
    """KS `BucketManager.select_bucket` without its mutable bucket lists (batching is done in dataset.py).

    * predefined buckets (enable_bucket, or the single `resolution` bucket without bucketing): the bucket whose
      aspect ratio is closest to the image's (the image's own size if it is a bucket), resized so the image
      covers it: scale = bucket_h / image_h if the image is wider than the bucket, else bucket_w / image_w.
    * bucket_no_upscale: an image larger than the max area is shrunk to that area keeping its aspect ratio
      (the side rounded to steps that keeps the ratio best, as KS); smaller images keep their size; the bucket
      is that size rounded down to steps, so nothing is enlarged. Images smaller than one step in a side are
      given a one-step bucket and enlarged to cover it (KS would make an empty bucket)."""

    def __init__(self, resolution_wh: tuple[int, int], *, enable_bucket: bool, no_upscale: bool,
                 min_size: int, max_size: int, reso_steps: int) -> None:
        self.max_area = resolution_wh[0] * resolution_wh[1]
        self.reso_steps = reso_steps
        self.no_upscale = enable_bucket and no_upscale
        if enable_bucket:
            self.predefined = make_bucket_resolutions(resolution_wh, min_size, max_size, reso_steps)
        else:
            self.predefined = [tuple(resolution_wh)]
        self.predefined_set = set(self.predefined)
        self.predefined_ar = np.array([w / h for w, h in self.predefined])

    def _round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select(self, image_width: int, image_height: int) -> BucketChoice:
        aspect = image_width / image_height
        if not self.no_upscale:
            bucket = (image_width, image_height)
            if bucket not in self.predefined_set:
                bucket = self.predefined[int(np.abs(self.predefined_ar - aspect).argmin())]
            if aspect > bucket[0] / bucket[1]:  # image wider than the bucket: match heights
                scale = bucket[1] / image_height
            else:
                scale = bucket[0] / image_width
            resized = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                resized_width = math.sqrt(self.max_area * aspect)
                resized_height = self.max_area / resized_width
                # Round the side whose rounding keeps the aspect ratio best (KS).
                width_rounded = self._round_to_steps(resized_width)
                height_in_wr = self._round_to_steps(width_rounded / aspect)
                height_rounded = self._round_to_steps(resized_height)
                width_in_hr = self._round_to_steps(height_rounded * aspect)
                ar_width_rounded = width_rounded / max(height_in_wr, 1)
                ar_height_rounded = width_in_hr / max(height_rounded, 1)
                if abs(ar_width_rounded - aspect) < abs(ar_height_rounded - aspect):
                    resized = (width_rounded, int(width_rounded / aspect + 0.5))
                else:
                    resized = (int(height_rounded * aspect + 0.5), height_rounded)
            else:
                resized = (image_width, image_height)
            bucket = (max(resized[0] - resized[0] % self.reso_steps, self.reso_steps),
                      max(resized[1] - resized[1] % self.reso_steps, self.reso_steps))
        resized = cover_size(resized, bucket)
        return BucketChoice(bucket_wh=tuple(bucket), resized_wh=resized, ar_error=bucket[0] / bucket[1] - aspect)


def cover_size(resized_wh: tuple[int, int], bucket_wh: tuple[int, int]) -> tuple[int, int]:
    """Guard against float rounding (and tiny images): the smallest scale-up of resized_wh covering the bucket."""
    width, height = resized_wh
    if width >= bucket_wh[0] and height >= bucket_wh[1]:
        return width, height
    scale = max(bucket_wh[0] / width, bucket_wh[1] / height)
    return max(math.ceil(width * scale - 1e-6), bucket_wh[0]), max(math.ceil(height * scale - 1e-6), bucket_wh[1])


def crop_offset(resized: int, bucket: int, random_crop: bool, uniform: float) -> int:
    """KS trim: centre (excess // 2), or with random_crop a uniform integer in [0, excess] from `uniform` in [0,1)."""
    excess = resized - bucket
    if excess <= 0:
        return 0
    return min(int(uniform * (excess + 1)), excess) if random_crop else excess // 2
