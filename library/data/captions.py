"""Captions: caption files, class-token fallback, and KS caption processing (`BaseDataset.process_caption`).

Processing, in KS's order:
  1. caption = prefix + " " + caption + " " + suffix (here per line of a multi-line caption; see below)
  2. dropped entirely ("") with probability caption_dropout_rate, or in every epoch with
     epoch % caption_dropout_every_n_epochs == 0 (epochs count from 1, as KS); nothing below happens then
  3. enable_wildcard: one line of a multi-line caption is chosen at random, then every `{a|b|c}` is replaced by
     one of its options chosen at random (`{{` and `}}` are literal braces). Without it: the first line.
  4. with shuffle_caption, token_warmup_step or caption_tag_dropout_rate: split at caption_separator; the first
     keep_tokens tags (or, with keep_tokens_separator, everything before the separator and after a second one)
     stay in place; token warmup keeps only the first N of the other tags (N grows with the step), these are
     shuffled, then each is dropped with probability caption_tag_dropout_rate; rejoined with ", ".
  5. secondary_separator is replaced by caption_separator (so "black;;dress" stays one tag through 4).
Randomness comes from a generator the caller seeds with (seed, epoch, batch number, position) (see
randomness.py), never from the global state, so a caption is the same in any worker and after a resume.
Deviations from KS: a keep_tokens_separator in a caption is always removed, also when nothing is shuffled (KS
leaves the literal separator in the caption then); empty tags are dropped; with a multi-line caption the prefix
and suffix go on the chosen line (KS adds them to the whole text, so only the first line gets the prefix).
"""
from __future__ import annotations

import logging
import math
import os
import re

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
    ("token_warmup_step", "--token_warmup_step"),
)
WILDCARD = re.compile(r"\{([^}]+)\}")


def find_caption_file(image_path: str, caption_extension: str) -> str | None:
    """`<stem><caption_extension>` beside the image; with the KS default ".caption", `<stem>.txt` when no
    `.caption` file exists (".txt" is what most captioning tools write)."""
    extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    stem = os.path.splitext(image_path)[0]
    candidates = [stem + extension]
    if extension == DEFAULT_CAPTION_EXTENSION:
        candidates.append(stem + FALLBACK_CAPTION_EXTENSION)
    return next((c for c in candidates if os.path.isfile(c)), None)


def read_caption_file(path: str, all_lines: bool = False) -> str | None:
    """The first non-empty line of a UTF-8 caption file (a UTF-8 byte-order mark is skipped), or None if empty.
    `all_lines` (KS enable_wildcard): every non-empty line, stripped, joined with "\n".

    A file that is not UTF-8 is a UserError naming it: training on a garbled caption silently is worse than
    stopping before training starts."""
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"caption file '{path}' is not UTF-8 text (byte {e.start}: {e.reason}); re-save it as "
                        "UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    return "\n".join(lines) if all_lines else lines[0]


def raw_caption(image_path: str, subset: SubsetConfig) -> str:
    """The caption before processing: the caption file, else the subset's class tokens, else ""."""
    path = find_caption_file(image_path, subset.caption_extension)
    if path is not None:
        caption = read_caption_file(path, all_lines=subset.enable_wildcard)
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


def caption_has_choices(caption: str) -> bool:
    """True when enable_wildcard would choose between alternatives in `caption` (several lines or a `{a|b}`)."""
    return "\n" in caption or WILDCARD.search(caption.replace("{{", "").replace("}}", "")) is not None


def warmup_steps(token_warmup_step: float, max_train_steps: int) -> float:
    """KS: token_warmup_step < 1 is a share of max_train_steps (floored to whole steps); else a step count."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return token_warmup_step


def warmup_tag_count(num_free: int, step: int, token_warmup_min: int, token_warmup_steps: float) -> int:
    """KS token warmup: how many of the `num_free` shuffleable tags (counted from the front, before shuffling)
    are kept at optimizer step `step` (0-based): floor(step * (num_free - min) / warmup_steps) + min until
    warmup_steps, then all of them."""
    if not token_warmup_steps or step >= token_warmup_steps:
        return num_free
    return math.floor(step * ((num_free - token_warmup_min) / token_warmup_steps)) + token_warmup_min


def _split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _split_kept_and_free(caption: str, subset: SubsetConfig) -> tuple[list[str], list[str], list[str]]:
    """(leading kept tags, free tags, trailing kept tags): KS keep_tokens_separator / keep_tokens rule."""
    separator, tag_separator = subset.keep_tokens_separator, subset.caption_separator
    if separator and separator in caption:
        kept_part, free_part = caption.split(separator, 1)
        trailing: list[str] = []
        if separator in free_part:
            free_part, trailing_part = free_part.split(separator, 1)
            trailing = _split_tags(trailing_part, tag_separator)
        return _split_tags(kept_part, tag_separator), _split_tags(free_part, tag_separator), trailing
    tags = _split_tags(caption, tag_separator)
    keep = max(subset.keep_tokens, 0)
    return tags[:keep], tags[keep:], []


def _with_prefix_suffix(line: str, subset: SubsetConfig) -> str:
    if subset.caption_prefix:
        line = subset.caption_prefix + " " + line
    if subset.caption_suffix:
        line = line + " " + subset.caption_suffix
    return line


def _choose_wildcards(caption: str, rng: np.random.Generator | None) -> str:
    """KS wildcards: one random line, then each `{a|b|c}` -> one option; `{{`/`}}` are literal braces.
    `rng` None: the first line and the first option of each wildcard (the deterministic caption)."""
    lines = caption.split("\n")
    caption = lines[int(rng.integers(len(lines)))] if rng is not None and len(lines) > 1 else lines[0]
    open_mark, close_mark = "\u2985", "\u2986"  # KS's escape markers, lengthened until absent from the caption
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(match: re.Match) -> str:
        options = match.group(1).split("|")
        return options[int(rng.integers(len(options)))] if rng is not None else options[0]

    caption = WILDCARD.sub(choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def process_caption(caption: str, subset: SubsetConfig, epoch: int, rng: np.random.Generator | None,
                    step: int = 0, max_train_steps: int = 0) -> str:
    """KS caption processing of one caption for `epoch` (1-based) at optimizer step `step` (0-based, for token
    warmup; `max_train_steps` resolves a fractional token_warmup_step). `rng` None means no randomness: the
    deterministic caption (prefix/suffix, first line, first wildcard option, no warmup), as used for cached
    text-encoder outputs and validation."""
    if rng is None:
        caption = _choose_wildcards(caption, None) if subset.enable_wildcard else caption.split("\n")[0]
        caption = _drop_separator(_with_prefix_suffix(caption, subset), subset)
        return _join_secondary(caption, subset)

    # Draw in a fixed order so one option does not shift another's stream: the dropout uniform first, the
    # wildcard choices from a child generator (spawning does not advance `rng`), then shuffle and tag dropout.
    u_drop = rng.random()
    wildcard_rng = rng.spawn(1)[0]
    dropped = subset.caption_dropout_rate > 0 and u_drop < subset.caption_dropout_rate
    every_n = subset.caption_dropout_every_n_epochs
    dropped = dropped or (every_n > 0 and epoch % every_n == 0)
    if dropped:
        return ""
    caption = _choose_wildcards(caption, wildcard_rng) if subset.enable_wildcard else caption.split("\n")[0]
    caption = _with_prefix_suffix(caption, subset)
    if not (subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0):
        return _join_secondary(_drop_separator(caption, subset), subset)

    kept, free, trailing = _split_kept_and_free(caption, subset)
    if subset.token_warmup_step > 0:
        steps = warmup_steps(subset.token_warmup_step, max_train_steps)
        free = free[:warmup_tag_count(len(free), step, subset.token_warmup_min, steps)]
    if subset.shuffle_caption:
        free = [free[i] for i in rng.permutation(len(free))]
    if subset.caption_tag_dropout_rate > 0:
        keep_mask = rng.random(len(free)) >= subset.caption_tag_dropout_rate
        free = [t for t, keep in zip(free, keep_mask) if keep]
    return _join_secondary(", ".join(kept + free + trailing), subset)


def _join_secondary(caption: str, subset: SubsetConfig) -> str:
    """KS: the secondary separator becomes the caption separator after shuffling and dropping."""
    if subset.secondary_separator:
        return caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


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
