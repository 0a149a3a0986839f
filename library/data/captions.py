"""Captions: caption files, class-token fallback, and KS caption processing (prefix/suffix, dropout, shuffle).

Processing follows KS `BaseDataset.process_caption`:
  1. caption = prefix + " " + caption + " " + suffix
  2. dropped entirely ("") with probability caption_dropout_rate, or in every epoch with
     epoch % caption_dropout_every_n_epochs == 0 (epochs count from 1, as KS)
  3. with shuffle_caption or caption_tag_dropout_rate: split at ","; the first keep_tokens tags (or, with
     keep_tokens_separator, everything before the separator and after a second one) stay in place, the rest are
     shuffled, then each is dropped with probability caption_tag_dropout_rate; rejoined with ", ".
Randomness comes from a generator the caller seeds with (seed, epoch, sample index) (see randomness.py).
One deviation from KS: a keep_tokens_separator in a caption is always removed, also when nothing is shuffled
(KS leaves the literal separator in the caption then).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from library.data.blueprint import SubsetConfig
from library.errors import UserError

logger = logging.getLogger(__name__)

TAG_SEPARATOR = ","
DEFAULT_CAPTION_EXTENSION = ".caption"
FALLBACK_CAPTION_EXTENSION = ".txt"

# Subset fields that make a caption differ between epochs, with their flag names (for error messages).
RANDOM_CAPTION_FLAGS = (
    ("shuffle_caption", "--shuffle_caption"),
    ("caption_dropout_rate", "--caption_dropout_rate"),
    ("caption_tag_dropout_rate", "--caption_tag_dropout_rate"),
    ("caption_dropout_every_n_epochs", "--caption_dropout_every_n_epochs"),
)


def find_caption_file(image_path: str, caption_extension: str) -> str | None:
    """`<stem><caption_extension>` beside the image; with the KS default ".caption", `<stem>.txt` when no
    `.caption` file exists (".txt" is what most captioning tools write)."""
    extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    stem = os.path.splitext(image_path)[0]
    candidates = [stem + extension]
    if extension == DEFAULT_CAPTION_EXTENSION:
        candidates.append(stem + FALLBACK_CAPTION_EXTENSION)
    return next((c for c in candidates if os.path.isfile(c)), None)


def read_caption_file(path: str) -> str | None:
    """The first non-empty line of a UTF-8 caption file (a UTF-8 byte-order mark is skipped), or None if empty.

    A file that is not UTF-8 is a UserError naming it: training on a garbled caption silently is worse than
    stopping before training starts."""
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"caption file '{path}' is not UTF-8 text (byte {e.start}: {e.reason}); re-save it as "
                        "UTF-8") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def raw_caption(image_path: str, subset: SubsetConfig) -> str:
    """The caption before processing: the caption file, else the subset's class tokens, else ""."""
    path = find_caption_file(image_path, subset.caption_extension)
    if path is not None:
        caption = read_caption_file(path)
        if caption is not None:
            return caption
        logger.warning("caption file '%s' is empty; using the class tokens %r instead", path,
                       subset.class_tokens or "")
    return subset.class_tokens or ""


def subset_has_random_captions(subset: SubsetConfig) -> bool:
    """True when a sample's caption may differ between epochs (shuffle or any dropout)."""
    return bool(random_caption_flags(subset))


def random_caption_flags(subset: SubsetConfig) -> list[str]:
    """The flags of `subset` that make its captions random, e.g. ['--shuffle_caption']."""
    return [flag for field, flag in RANDOM_CAPTION_FLAGS if getattr(subset, field)]


def _split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(TAG_SEPARATOR) if t.strip()]


def _split_kept_and_free(caption: str, subset: SubsetConfig) -> tuple[list[str], list[str], list[str]]:
    """(leading kept tags, free tags, trailing kept tags): KS keep_tokens_separator / keep_tokens rule."""
    separator = subset.keep_tokens_separator
    if separator and separator in caption:
        kept_part, free_part = caption.split(separator, 1)
        trailing: list[str] = []
        if separator in free_part:
            free_part, trailing_part = free_part.split(separator, 1)
            trailing = _split_tags(trailing_part)
        return _split_tags(kept_part), _split_tags(free_part), trailing
    tags = _split_tags(caption)
    keep = max(subset.keep_tokens, 0)
    return tags[:keep], tags[keep:], []


def process_caption(caption: str, subset: SubsetConfig, epoch: int, rng: np.random.Generator | None) -> str:
    """KS caption processing of one caption for `epoch` (1-based). `rng` None means no randomness: the
    deterministic caption (prefix/suffix only), as used for cached text-encoder outputs and validation."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    if rng is None:
        return _drop_separator(caption, subset)

    # Always draw the same number of uniforms in the same order so one option does not shift another's stream.
    u_drop = rng.random()
    dropped = subset.caption_dropout_rate > 0 and u_drop < subset.caption_dropout_rate
    every_n = subset.caption_dropout_every_n_epochs
    dropped = dropped or (every_n > 0 and epoch % every_n == 0)
    if dropped:
        return ""
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        return _drop_separator(caption, subset)

    kept, free, trailing = _split_kept_and_free(caption, subset)
    if subset.shuffle_caption:
        free = [free[i] for i in rng.permutation(len(free))]
    if subset.caption_tag_dropout_rate > 0:
        keep_mask = rng.random(len(free)) >= subset.caption_tag_dropout_rate
        free = [t for t, keep in zip(free, keep_mask) if keep]
    return ", ".join(kept + free + trailing)


def _drop_separator(caption: str, subset: SubsetConfig) -> str:
    if not subset.keep_tokens_separator or subset.keep_tokens_separator not in caption:
        return caption
    kept, free, trailing = _split_kept_and_free(caption, subset)
    return ", ".join(kept + free + trailing)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """KS `set_tag_frequency`: lower-cased comma-separated tags counted over the raw captions of a folder."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(TAG_SEPARATOR):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
