"""The dataset group: scanned images of every subset, their buckets, per-epoch batches, sample loading, caches and
the KS metadata summary.

Build it with `build_dataset_group(DatasetOptions)`. Then per epoch (1-based, as KS):
    group.set_epoch(epoch)                      # batches of this epoch, shuffled by (seed, epoch)
    group.skip_batches(n)                       # resume: the first n batches are not loaded
    loader = make_dataloader(group)             # loader.py; yields the batch dicts of `load_batch`
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from library.data import data_warnings
from library.data.blueprint import DatasetConfig, SubsetConfig
from library.data.buckets import BucketSelector, crop_offset
from library.data.captions import (caption_has_choices, process_caption, random_caption_flags, raw_caption,
                                   tag_frequency)
from library.data.dataset_config import resolve_datasets
from library.data.folders import list_images
from library.data.images import color_augment, load_rgb, pixels_to_tensor_batch, probe_images, resize_and_crop
from library.data import masks as mask_lib
from library.data.latent_cache import (latent_cache_path, latent_identity, load_if_valid, save_atomic,
                                       text_cache_path, text_identity)
from library.data.metadata_file import metadata_entries
from library.data.options import DatasetOptions
from library.data.randomness import data_rng
from library.errors import UserError

logger = logging.getLogger(__name__)

# Bad image files (unreadable, truncated, empty) are skipped with a warning up to this share of all image files
# found; above it the data is more likely wrong than a few files broken, so we stop before training.
MAX_BAD_IMAGE_SHARE = 0.10
# Per-epoch pixel augmentations that cached latents cannot carry (KS `is_latent_cacheable`); --flip_aug can: both
# flips are cached.
AUGMENTATION_FLAGS = (("random_crop", "--random_crop"), ("color_aug", "--color_aug"))
FLIPPED_LATENTS = "latents_flipped"


@dataclass
class ImageItem:
    """One image file of one subset, scanned, with its bucket geometry (sizes (w, h) as KS unless named _hw)."""
    index: int
    path: str
    dataset_index: int
    subset_index: int                      # into DatasetGroup.subsets
    caption: str                           # before processing (caption file or class tokens)
    original_size_hw: tuple[int, int]
    bucket_wh: tuple[int, int]
    resized_wh: tuple[int, int]
    ar_error: float
    num_repeats: int                       # times per epoch (reg items: after KS balancing; 0 = unused)
    loss_weight: float
    is_reg: bool
    is_val: bool                           # held out for validation (is_val subset or validation_split)
    file_size: int
    mtime_ns: int
    tags: str | None = None                # metadata_file subsets: the tags (KS counts them for ss_tag_frequency)
    # Filled by the caches: in memory (latents / text_outputs) or a file beside the image (*_path), with what
    # they were computed from (latents_key = the caller's VAE identity; text_identity = cache key + caption).
    # latents_flipped: the encoding of the mirrored image (flip_aug subsets; on disk as a second tensor).
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    latents_path: str | None = None
    latents_key: str | None = None
    text_outputs: dict[str, torch.Tensor] | None = None
    text_outputs_path: str | None = None
    text_identity: dict[str, str] | None = None
    # Loss mask (library/data/masks.py): "alpha", a mask file's path, or None; cached with the latents.
    mask_source: str | None = None
    mask_latent: torch.Tensor | None = None

    @property
    def target_size_hw(self) -> tuple[int, int]:
        return self.bucket_wh[1], self.bucket_wh[0]

    @property
    def center_crop_left_top(self) -> tuple[int, int]:
        return ((self.resized_wh[0] - self.bucket_wh[0]) // 2, (self.resized_wh[1] - self.bucket_wh[1]) // 2)


@dataclass(frozen=True)
class CacheStats:
    computed: int
    reused: int


@dataclass
class DatasetGroup:
    """All datasets of a run. Items are unique image files; batches are lists of item indices."""
    datasets: list[DatasetConfig]
    subsets: list[SubsetConfig]
    subset_dataset: list[int]              # dataset index of each subset
    items: list[ImageItem]
    seed: int = 0
    epoch: int = 1
    skipped_batches: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    max_train_steps: int = 0               # resolves a fractional token_warmup_step (KS); set by the loop
    skip_cache_check: bool = False         # KS --skip_cache_check: reuse existing cache files unchecked
    _batches: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    # ---- batches ----------------------------------------------------------------------------------------------
    def training_items(self) -> list[ImageItem]:
        return [item for item in self.items if not item.is_val and item.num_repeats > 0]

    def make_batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`: per dataset and bucket, every training item num_repeats times, shuffled with
        a generator of (seed, epoch, dataset), cut into batch_size chunks (the last may be short, as KS); then
        all batches shuffled with a generator of (seed, epoch). Each batch lies in one bucket of one dataset."""
        if self._batches is not None and self._batches[0] == epoch:
            return self._batches[1]
        by_bucket: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
        for item in self.training_items():
            by_bucket[(item.dataset_index, item.bucket_wh)].extend([item.index] * item.num_repeats)
        batches: list[list[int]] = []
        for d_index, dataset in enumerate(self.datasets):
            rng = data_rng(self.seed, "bucket-shuffle", epoch, d_index)
            for key in sorted(k for k in by_bucket if k[0] == d_index):
                members = np.asarray(by_bucket[key])[rng.permutation(len(by_bucket[key]))].tolist()
                batches.extend(members[i:i + dataset.batch_size] for i in range(0, len(members), dataset.batch_size))
        order = data_rng(self.seed, "batch-order", epoch).permutation(len(batches))
        batches = [batches[i] for i in order]
        self._batches = (epoch, batches)
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (1-based, as KS) whose batches the loader yields; clears any skip."""
        self.epoch = epoch
        self.skipped_batches = 0

    def skip_batches(self, count: int) -> None:
        """Resume inside an epoch: the loader starts at batch `count` of the current epoch without loading the
        batches before it; the remaining batches are those of an uninterrupted epoch."""
        if not 0 <= count <= self.num_batches_per_epoch:
            raise ValueError(f"cannot skip {count} of {self.num_batches_per_epoch} batches")
        self.skipped_batches = count

    @property
    def num_batches_per_epoch(self) -> int:
        return len(self.make_batches(self.epoch))

    # ---- loading ----------------------------------------------------------------------------------------------
    def load_batch(self, indices: list[int], epoch: int, batch_number: int, augment: bool = True,
                   step: int = 0) -> dict[str, Any]:
        """The batch dict of items `indices`, trained at optimizer step `step` (0-based; token warmup). Random
        choices (caption, crop, flip, colour) come from generators of (seed, epoch, batch_number, position).
        `augment=False`: centre crop, no flip / colour, the deterministic caption (validation and cache filling)."""
        items = [self.items[i] for i in indices]
        subsets = [self.subsets[item.subset_index] for item in items]
        captions, crops, pixels, flips, masks = [], [], [], [], []
        use_latents = all(item.latents is not None or item.latents_path for item in items)
        for position, (item, subset) in enumerate(zip(items, subsets)):
            aug_rng = data_rng(self.seed, "augment", epoch, batch_number, position) if augment else None
            caption_rng = data_rng(self.seed, "caption", epoch, batch_number, position) if augment else None
            if item.text_outputs is not None or item.text_outputs_path:
                caption_rng = None  # cached conditioning was computed from the deterministic caption
            captions.append(process_caption(item.caption, subset, epoch, caption_rng, step, self.max_train_steps))
            crop_left_top, flip = self._geometry(item, subset, aug_rng)
            flips.append(flip)
            crops.append((crop_left_top[1], _flipped_left(item, crop_left_top[0]) if flip else crop_left_top[0]))
            if not use_latents:
                pixels.append(self._pixels(item, subset, crop_left_top, flip, aug_rng))
            masks.append(self._mask(item, crop_left_top, flip, use_latents))
        return {
            "images": None if use_latents else pixels_to_tensor_batch(pixels),
            "latents": torch.stack([self._latents(it, f) for it, f in zip(items, flips)]) if use_latents else None,
            "captions": captions,
            "loss_weights": torch.tensor([item.loss_weight for item in items], dtype=torch.float32),
            "original_sizes": torch.tensor([item.original_size_hw for item in items], dtype=torch.long),
            "crop_top_lefts": torch.tensor(crops, dtype=torch.long),
            "target_sizes": torch.tensor([item.target_size_hw for item in items], dtype=torch.long),
            "image_paths": [item.path for item in items],
            "text_encoder_outputs": self._stacked_text_outputs(items),
            "item_indices": torch.tensor([item.index for item in items], dtype=torch.long),
            "masks": mask_lib.stack_masks(masks),
        }

    def _mask(self, item: ImageItem, crop_left_top: tuple[int, int], flip: bool, cached: bool) -> torch.Tensor | None:
        """The item's loss mask [1, H, W] (image size; latent size when latents are cached, mirrored for a
        flipped latent: area averaging commutes with the flip), or None."""
        if item.mask_source is None:
            return None
        if cached:
            mask = item.mask_latent
            if mask is None:
                identity = None if self.skip_cache_check else self._latent_identity(item, item.latents_key)
                tensors = load_if_valid(item.latents_path, identity)
                if tensors is None or "mask" not in tensors:
                    raise UserError(f"latent cache '{item.latents_path}' disappeared or changed during training; "
                                    "run again (without --skip_cache_check) to recompute it")
                mask = tensors["mask"]
            return mask.flip(-1) if flip else mask
        mask = mask_lib.load_mask(item.mask_source, item.path)
        return torch.from_numpy(mask_lib.mask_pixels(mask, item.resized_wh, item.bucket_wh, crop_left_top, flip))[None]

    @staticmethod
    def _geometry(item: ImageItem, subset: SubsetConfig,
                  rng: np.random.Generator | None) -> tuple[tuple[int, int], bool]:
        """(crop left, crop top) in the resized image, and whether to flip. Always draws 3 uniforms."""
        if rng is None:
            return item.center_crop_left_top, False
        u_left, u_top, u_flip = rng.random(3)
        left = crop_offset(item.resized_wh[0], item.bucket_wh[0], subset.random_crop, u_left)
        top = crop_offset(item.resized_wh[1], item.bucket_wh[1], subset.random_crop, u_top)
        return (left, top), bool(subset.flip_aug and u_flip < 0.5)

    @staticmethod
    def _pixels(item: ImageItem, subset: SubsetConfig, crop_left_top: tuple[int, int], flip: bool,
                rng: np.random.Generator | None) -> np.ndarray:
        image = resize_and_crop(load_rgb(item.path), item.resized_wh, item.bucket_wh, crop_left_top,
                                subset.resize_interpolation)
        pixels = np.asarray(image)
        if flip:
            pixels = pixels[:, ::-1]
        if subset.color_aug and rng is not None:
            pixels = color_augment(np.ascontiguousarray(pixels), rng)
        return np.ascontiguousarray(pixels)

    def _latents(self, item: ImageItem, flipped: bool) -> torch.Tensor:
        """The cached latent of the image, or of its mirror image when `flipped` (KS: both are cached). Anything
        cached with a latent in image layout (a loss mask) must be mirrored too when `flipped`."""
        if item.latents is not None:
            return item.latents_flipped if flipped else item.latents
        identity = None if self.skip_cache_check else self._latent_identity(item, item.latents_key)
        tensors = load_if_valid(item.latents_path, identity)
        key = FLIPPED_LATENTS if flipped else "latents"
        if tensors is None or key not in tensors:
            raise UserError(f"latent cache '{item.latents_path}' disappeared or changed during training; "
                            "run again (without --skip_cache_check) to recompute it")
        return tensors[key]

    def _stacked_text_outputs(self, items: list[ImageItem]) -> dict[str, torch.Tensor] | None:
        if not all(item.text_outputs is not None or item.text_outputs_path for item in items):
            return None
        outputs = [item.text_outputs if item.text_outputs is not None else _load_text_outputs(item)
                   for item in items]
        return {key: torch.stack([o[key] for o in outputs]) for key in outputs[0]}

    # ---- validation --------------------------------------------------------------------------------------------
    def validation_items(self) -> list[ImageItem]:
        """Items held out for validation: every image of `is_val = true` subsets and the validation_split share
        of the other non-reg subsets. They never appear in training batches."""
        return [item for item in self.items if item.is_val]

    def validation_batches(self) -> list[list[int]]:
        """Validation items in a fixed order, batched inside buckets with their dataset's batch size."""
        by_bucket: dict[tuple[int, tuple[int, int]], list[int]] = defaultdict(list)
        for item in self.validation_items():
            by_bucket[(item.dataset_index, item.bucket_wh)].append(item.index)
        batches = []
        for key in sorted(by_bucket):
            size = self.datasets[key[0]].batch_size
            batches.extend(by_bucket[key][i:i + size] for i in range(0, len(by_bucket[key]), size))
        return batches

    # ---- captions ---------------------------------------------------------------------------------------------
    def random_caption_flags(self) -> list[tuple[str, str]]:
        """(flag, image_dir) for every used subset whose captions change between epochs."""
        used = {item.subset_index for item in self.items if item.num_repeats > 0 or item.is_val}
        flags = [(flag, _subset_name(self.subsets[i])) for i in sorted(used)
                 for flag in random_caption_flags(self.subsets[i])]
        # enable_wildcard makes a caption random only when it has alternatives (lines or {a|b}).
        wild = sorted({item.subset_index for item in self.items if item.subset_index in used
                       and self.subsets[item.subset_index].enable_wildcard and caption_has_choices(item.caption)})
        return flags + [("--enable_wildcard", _subset_name(self.subsets[i])) for i in wild]

    def captions_are_deterministic(self) -> bool:
        """True when every caption is the same in every epoch (needed by --cache_text_encoder_outputs)."""
        return not self.random_caption_flags()

    def deterministic_caption(self, item: ImageItem) -> str:
        return process_caption(item.caption, self.subsets[item.subset_index], self.epoch, None)

    # ---- caches -----------------------------------------------------------------------------------------------
    def check_latent_cache_allowed(self) -> None:
        """KS rule: cached latents are computed once, so random crops and colour changes cannot apply (flips can:
        both the image and its mirror image are encoded)."""
        for subset in self.subsets:
            for field_name, flag in AUGMENTATION_FLAGS:
                if getattr(subset, field_name):
                    raise UserError(f"--cache_latents and {flag} cannot be used together (subset "
                                    f"'{_subset_name(subset)}'): latents are encoded once; drop one of them")

    def check_text_cache_allowed(self) -> None:
        """Cached text-encoder outputs are computed once, so captions must not change between epochs."""
        flags = self.random_caption_flags()
        if flags:
            flag, image_dir = flags[0]
            raise UserError(f"--cache_text_encoder_outputs needs captions that are the same every epoch, but {flag} "
                            f"is set (subset '{image_dir}'); remove {flag} or --cache_text_encoder_outputs")

    def _cached_items(self) -> list[ImageItem]:
        return [item for item in self.items if item.num_repeats > 0 or item.is_val]

    def cache_latents(self, encode_fn: Callable[[torch.Tensor], torch.Tensor], to_disk: bool, cache_key: str,
                      batch_size: int = 1, device: torch.device | str = "cpu") -> CacheStats:
        """Encode every used image once, `batch_size` images per call (KS --vae_batch_size): `encode_fn` maps
        images [B, 3, H, W] in [-1, 1] on `device` to latents. Images of flip_aug subsets are also encoded
        mirrored (KS caches both flips; a batch then takes the one its flip draw asks for). In memory, or with
        `to_disk` as `<stem>_<hash>.safetensors` beside the image (loaded lazily per batch), reused only when
        cache_key (VAE identity), the image file (size, mtime), the bucket and the flip setting all match
        (with skip_cache_check: whenever the file exists and holds the flips needed)."""
        self.check_latent_cache_allowed()
        pending: dict[tuple[tuple[int, int], bool], list[ImageItem]] = defaultdict(list)
        reused = 0
        for item in self._cached_items():
            flip = self.subsets[item.subset_index].flip_aug
            if to_disk:
                path = latent_cache_path(item.path, cache_key, item.bucket_wh)
                item.latents_path, item.latents, item.latents_flipped, item.latents_key = path, None, None, cache_key
                if self._disk_latents_usable(item, cache_key, flip):
                    reused += 1
                    continue
            elif item.latents is not None and item.latents_key == cache_key and (item.latents_flipped is not None
                                                                                 or not flip):
                reused += 1
                continue
            pending[(item.bucket_wh, flip)].append(item)
        computed = 0
        for bucket, flip in sorted(pending):
            group = pending[(bucket, flip)]
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                pixels = [self._pixels(it, self.subsets[it.subset_index], it.center_crop_left_top, False, None)
                          for it in chunk]
                images = pixels_to_tensor_batch(pixels).to(device)
                with torch.no_grad():
                    latents = encode_fn(images).detach().float().cpu()
                    flipped = encode_fn(torch.flip(images, dims=[3])).detach().float().cpu() if flip else None
                for i, it in enumerate(chunk):
                    latent = latents[i].clone()  # own storage, not a view into the batch
                    latent_flipped = flipped[i].clone() if flip else None
                    mask = None
                    if it.mask_source is not None:  # the mask at the latent's size, cached with it
                        full = self._mask(it, it.center_crop_left_top, False, cached=False)
                        mask = mask_lib.to_latent_size(full, tuple(latent.shape[-2:]))
                    if to_disk:
                        tensors = {"latents": latent}
                        if flip:
                            tensors[FLIPPED_LATENTS] = latent_flipped
                        if mask is not None:
                            tensors["mask"] = mask
                        save_atomic(it.latents_path, tensors, self._latent_identity(it, cache_key))
                    else:
                        it.latents, it.latents_flipped, it.latents_path = latent, latent_flipped, None
                        it.latents_key, it.mask_latent = cache_key, mask
                computed += len(chunk)
        logger.info("latents: %d computed, %d reused from cache", computed, reused)
        return CacheStats(computed=computed, reused=reused)

    def _latent_identity(self, item: ImageItem, cache_key: str) -> dict[str, str]:
        """What a cached latent was computed from (latent_cache.latent_identity, plus the flip and resize
        settings when they are not the defaults)."""
        identity = latent_identity(cache_key, item.path, item.file_size, item.mtime_ns, item.bucket_wh,
                                   item.resized_wh, item.center_crop_left_top)
        subset = self.subsets[item.subset_index]
        if subset.flip_aug:
            identity["flip_aug"] = "true"
        if item.mask_source == mask_lib.ALPHA:
            identity["mask"] = mask_lib.ALPHA  # the image file's identity covers its alpha channel
        elif item.mask_source is not None:
            stat = os.stat(item.mask_source)
            identity["mask"] = f"{os.path.basename(item.mask_source)}:{stat.st_size}:{stat.st_mtime_ns}"
        if subset.resize_interpolation:
            identity["resize_interpolation"] = subset.resize_interpolation
        return identity

    def _disk_latents_usable(self, item: ImageItem, cache_key: str, flip: bool) -> bool:
        if not self.skip_cache_check:
            return load_if_valid(item.latents_path, self._latent_identity(item, cache_key)) is not None
        try:  # KS --skip_cache_check: the file exists and holds the tensors needed; nothing else is read
            with safe_open(item.latents_path, framework="pt") as f:
                return "latents" in f.keys() and (not flip or FLIPPED_LATENTS in f.keys())
        except Exception:  # missing, torn or foreign file: compute it  # noqa: BLE001
            return False

    def cache_text_encoder_outputs(self, encode_fn: Callable[[list[str]], dict[str, torch.Tensor]], to_disk: bool,
                                   cache_key: str, batch_size: int = 16) -> CacheStats:
        """Encode every used item's deterministic caption once: `encode_fn(captions)` returns a dict of tensors
        with a leading batch dimension. In memory (one entry per distinct caption) or with `to_disk` as
        `<stem>_te_<hash>.safetensors` beside the image, reused when cache_key and the caption text match."""
        self.check_text_cache_allowed()
        pending: dict[str, list[ImageItem]] = defaultdict(list)
        reused = 0
        for item in self._cached_items():
            caption = self.deterministic_caption(item)
            if to_disk:
                item.text_outputs_path, item.text_outputs = text_cache_path(item.path, cache_key), None
                item.text_identity = text_identity(cache_key, caption)
                if self.skip_cache_check and os.path.isfile(item.text_outputs_path):
                    item.text_identity = None  # KS --skip_cache_check: the existing file is used unchecked
                    reused += 1
                    continue
                if load_if_valid(item.text_outputs_path, item.text_identity) is not None:
                    reused += 1
                    continue
            pending[caption].append(item)
        captions = list(pending)
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            with torch.no_grad():
                outputs = encode_fn(chunk)
            for i, caption in enumerate(chunk):
                one = {key: value[i].detach().cpu().clone() for key, value in outputs.items()}
                for item in pending[caption]:
                    if to_disk:
                        save_atomic(item.text_outputs_path, one, item.text_identity)
                    else:
                        item.text_outputs, item.text_outputs_path = one, None
        computed = sum(len(v) for v in pending.values())
        logger.info("text-encoder outputs: %d computed (%d distinct captions), %d reused", computed, len(captions),
                    reused)
        return CacheStats(computed=computed, reused=reused)

    # ---- summary ----------------------------------------------------------------------------------------------
    @property
    def num_train_images(self) -> int:
        """KS count: non-reg training images x their repeats."""
        return sum(item.num_repeats for item in self.training_items() if not item.is_reg)

    @property
    def num_reg_images(self) -> int:
        """KS count: regularisation images x their folder repeats (before balancing)."""
        return sum(self.subsets[item.subset_index].num_repeats for item in self.items
                   if item.is_reg and not item.is_val)

    def bucket_info(self) -> dict[str, Any]:
        """KS `bucket_info`: {"buckets": {i: {"resolution": [w, h], "count": samples per epoch}},
        "mean_img_ar_error": mean |bucket ar - image ar|} over all datasets."""
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for item in self.training_items():
            counts[item.bucket_wh] += item.num_repeats
        errors = [abs(item.ar_error) for item in self.training_items()]
        return {"buckets": {i: {"resolution": list(reso), "count": counts[reso]}
                            for i, reso in enumerate(sorted(counts))},
                "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}

    def metadata(self) -> dict[str, Any]:
        """KS `ss_*` dataset summary; dict values are JSON strings as KS writes them."""
        dirs: dict[str, dict[str, int]] = {}
        reg_dirs: dict[str, dict[str, int]] = {}
        captions_by_dir: dict[str, list[str]] = defaultdict(list)
        for s_index, subset in enumerate(self.subsets):
            members = [it for it in self.items if it.subset_index == s_index and not it.is_val]
            if not members:
                continue
            # KS names a fine-tuning subset by its metadata file and counts only its tags.
            name = os.path.basename(os.path.normpath(_subset_name(subset)))
            (reg_dirs if subset.is_reg else dirs)[name] = {"n_repeats": subset.num_repeats, "img_count": len(members)}
            captions_by_dir[name].extend(it.tags or "" if subset.metadata_file else it.caption for it in members)
        return {
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dirs),
            "ss_tag_frequency": json.dumps({d: tag_frequency(c) for d, c in captions_by_dir.items()}),
            "ss_num_train_images": self.num_train_images,
            "ss_num_reg_images": self.num_reg_images,
            "ss_bucket_info": json.dumps(self.bucket_info()),
            "ss_num_batches_per_epoch": self.num_batches_per_epoch,
        }


def _flipped_left(item: ImageItem, left: int) -> int:
    """Crop left edge measured in the mirrored resized image (what the model sees after a flip)."""
    return item.resized_wh[0] - (left + item.bucket_wh[0])


def _subset_name(subset: SubsetConfig) -> str:
    """How messages name a subset: its folder, or its metadata file."""
    return subset.metadata_file or subset.image_dir


def _load_text_outputs(item: ImageItem) -> dict[str, torch.Tensor]:
    tensors = load_if_valid(item.text_outputs_path, item.text_identity)
    if tensors is None:
        raise UserError(f"text-encoder cache '{item.text_outputs_path}' disappeared or changed during training; "
                        "run again (without --skip_cache_check) to recompute it")
    return tensors


# ---- building ---------------------------------------------------------------------------------------------------
def build_dataset_group(options: DatasetOptions, max_bad_share: float = MAX_BAD_IMAGE_SHARE,
                        scan_workers: int = 4) -> DatasetGroup:
    """Resolve the datasets, scan every image up front (size and integrity), read captions, assign buckets, split
    validation, balance regularisation repeats (KS), and check flag combinations. Every problem with the data
    surfaces here, before any model is loaded."""
    options.check()
    datasets = resolve_datasets(options)
    subsets = [s for d in datasets for s in d.subsets]
    subset_dataset = [d_i for d_i, d in enumerate(datasets) for _ in d.subsets]
    group = DatasetGroup(datasets=datasets, subsets=subsets, subset_dataset=subset_dataset, items=[],
                         seed=options.data_seed, skip_cache_check=options.skip_cache_check)
    if options.cache_latents or options.cache_latents_to_disk:
        group.check_latent_cache_allowed()

    paths_by_subset = []
    known: list[dict[str, tuple[str, str | None]]] = []  # metadata subsets: path -> (caption, tags)
    for subset in subsets:
        if subset.metadata_file:
            entries = metadata_entries(subset)
            paths = [e.path for e in entries]
            known.append({e.path: (e.caption, e.tags) for e in entries})
        else:
            paths = list_images(subset.image_dir)
            known.append({})
        if not paths:
            raise UserError(f"image folder '{subset.image_dir}' contains no images (.png, .jpg, .jpeg, .webp, "
                            ".bmp); add images or remove the folder")
        paths_by_subset.append(paths)
    all_paths = [p for paths in paths_by_subset for p in paths]
    probes, bad = probe_images(all_paths, max_workers=scan_workers)
    _report_bad_files(bad, len(all_paths), max_bad_share)
    probe_of = {p.path: p for p in probes}
    group.skipped_files = bad

    selectors = [BucketSelector(d.resolution, enable_bucket=d.enable_bucket, no_upscale=d.bucket_no_upscale,
                                min_size=d.min_bucket_reso, max_size=d.max_bucket_reso,
                                reso_steps=d.bucket_reso_steps) for d in datasets]
    for s_index, (subset, paths) in enumerate(zip(subsets, paths_by_subset)):
        d_index = subset_dataset[s_index]
        good = [p for p in paths if p in probe_of]
        held_out = _validation_paths(good, subset, datasets[d_index], options.data_seed, s_index)
        mask_of = _mask_sources(subset, good, probe_of)
        for path in good:
            probe = probe_of[path]
            choice = selectors[d_index].select(probe.width, probe.height)
            caption, tags = known[s_index].get(path) or (raw_caption(path, subset), None)
            group.items.append(ImageItem(
                index=len(group.items), path=path, dataset_index=d_index, subset_index=s_index, tags=tags,
                caption=caption, original_size_hw=(probe.height, probe.width),
                bucket_wh=choice.bucket_wh, resized_wh=choice.resized_wh, ar_error=choice.ar_error,
                num_repeats=subset.num_repeats, loss_weight=subset.loss_weight, is_reg=subset.is_reg,
                is_val=subset.is_val or path in held_out, file_size=probe.file_size, mtime_ns=probe.mtime_ns,
                mask_source=mask_of.get(path)))
    mask_lib.check_mask_options(options.masked_loss, options.masked_loss_normalization,
                                any(s.conditioning_data_dir for s in subsets), any(s.alpha_mask for s in subsets))
    for d_index in range(len(datasets)):
        _balance_regularisation(group, d_index)
    if options.cache_text_encoder_outputs or options.cache_text_encoder_outputs_to_disk:
        group.check_text_cache_allowed()
    if not group.training_items():
        raise UserError("the dataset has no training images left (all are held out for validation, regularisation "
                        "images without training images, or skipped as bad files); check the image folders")
    group.make_batches(group.epoch)
    data_warnings.warn_about_files([s.image_dir for s in subsets])
    data_warnings.warn_about_geometry(group.items)
    _log_summary(group)
    return group


def _mask_sources(subset: SubsetConfig, paths: list[str], probe_of: dict) -> dict[str, str]:
    """{image path: mask source} of a subset: its conditioning_data_dir masks (checked to exist and to have the
    image's size), else "alpha" with alpha_mask, else nothing."""
    if subset.conditioning_data_dir:
        files = mask_lib.mask_files(subset.conditioning_data_dir, paths, f"subset '{_subset_name(subset)}'")
        for path, mask_path in files.items():
            mask_lib.check_mask_size(mask_path, (probe_of[path].width, probe_of[path].height))
        return files
    if subset.alpha_mask:
        return {path: mask_lib.ALPHA for path in paths}
    return {}


def _report_bad_files(bad: list[tuple[str, str]], total: int, max_bad_share: float) -> None:
    for path, reason in bad:
        logger.warning("skipping image '%s': it %s", path, reason)
    if bad and len(bad) > max_bad_share * total:
        listing = "; ".join(f"'{p}' {r}" for p, r in bad[:10]) + ("; ..." if len(bad) > 10 else "")
        raise UserError(f"{len(bad)} of {total} image files cannot be used (more than the "
                        f"{max_bad_share:.0%} that are skipped with a warning): {listing}. Fix or remove them")
    if bad and len(bad) == total:
        raise UserError(f"no usable image: all {total} files are bad; first: '{bad[0][0]}' {bad[0][1]}")


def _validation_paths(paths: list[str], subset: SubsetConfig, dataset: DatasetConfig, seed: int,
                      subset_index: int) -> set[str]:
    """KS `split_train_val`: shuffle the subset's images with validation_seed (else the seed) and hold out the
    last round(n * validation_split). Reg and is_val subsets are not split."""
    if subset.is_reg or subset.is_val or dataset.validation_split <= 0:
        return set()
    n_train = math.ceil(len(paths) * (1 - dataset.validation_split))
    val_seed = dataset.validation_seed if dataset.validation_seed is not None else seed
    order = data_rng(val_seed, "validation-split", subset_index).permutation(len(paths))
    return {paths[i] for i in order[n_train:]}


def _balance_regularisation(group: DatasetGroup, d_index: int) -> None:
    """KS DreamBoothDataset: regularisation images are used as often as training images in total. Reg images are
    taken in order with their folder repeats until the count reaches the number of training samples (the rest
    are unused); if all are taken and the count is still lower, each gets one more repeat in turn."""
    train_count = sum(it.num_repeats for it in group.items
                      if it.dataset_index == d_index and not it.is_reg and not it.is_val)
    reg = [it for it in group.items if it.dataset_index == d_index and it.is_reg and not it.is_val]
    if not reg:
        return
    counted = 0
    for it in reg:
        if counted >= train_count:
            it.num_repeats = 0
        else:
            counted += it.num_repeats
    while counted < train_count:
        for it in reg:
            it.num_repeats += 1
            counted += 1
            if counted >= train_count:
                break
    unused = sum(1 for it in reg if it.num_repeats == 0)
    if unused:
        logger.info("dataset %d: %d regularisation images are not needed to match %d training samples (KS)",
                    d_index + 1, unused, train_count)


def _log_summary(group: DatasetGroup) -> None:
    info = group.bucket_info()
    logger.info("dataset: %d training samples, %d regularisation, %d validation images, %d batches per epoch, "
                "%d buckets", group.num_train_images, group.num_reg_images, len(group.validation_items()),
                group.num_batches_per_epoch, len(info["buckets"]))
