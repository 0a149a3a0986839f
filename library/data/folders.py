"""KS DreamBooth folder layout: `<train_data_dir>/<repeats>_<class tokens>/image.png`.

KS `extract_dreambooth_params`: the folder name is split at '_'; the first part must be an integer (the repeat
count), the rest, joined by '_', is the class tokens (the caption of images without a caption file). Folders
without that prefix are skipped with a warning, as KS does; if none is valid we stop with a UserError.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

from library.data.blueprint import SubsetConfig
from library.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """'10_sks dog' -> (10, 'sks dog'); '3_a_b' -> (3, 'a_b'); no integer prefix or repeats < 1 -> None."""
    head, _, tail = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    if repeats < 1:
        return None
    return repeats, tail


def list_images(image_dir: str) -> list[str]:
    """Image files directly inside `image_dir` (png, jpg, jpeg, webp, bmp; any case), sorted by name."""
    names = sorted(n for n in os.listdir(image_dir)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(image_dir, n)))
    return [os.path.join(image_dir, n) for n in names]


def require_dir(path: str, flag: str) -> None:
    """UserError naming `path` when it is missing or not a folder."""
    if not os.path.exists(path):
        raise UserError(f"{flag}: folder '{path}' does not exist; check the path")
    if not os.path.isdir(path):
        raise UserError(f"{flag}: '{path}' is a file, not a folder of images")


def subsets_from_folders(root: str, template: SubsetConfig, flag: str) -> list[SubsetConfig]:
    """One subset per valid `<repeats>_<class tokens>` folder under `root`, other fields from `template`.

    Invalid folder names are skipped with a warning (KS); hidden folders (".cache") silently. No valid folder at
    all is a UserError naming `root` and the expected form."""
    require_dir(root, flag)
    subsets: list[SubsetConfig] = []
    skipped: list[str] = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or name.startswith("."):
            continue
        parsed = parse_folder_name(name)
        if parsed is None:
            logger.warning("%s: skipping folder '%s': its name does not start with '<repeats>_' "
                           "(e.g. '10_sks dog')", flag, path)
            skipped.append(name)
            continue
        repeats, class_tokens = parsed
        subsets.append(replace(template, image_dir=path, num_repeats=repeats, class_tokens=class_tokens))
    if not subsets:
        found = f"; found {', '.join(repr(s) for s in skipped)}" if skipped else "; it has no subfolders"
        raise UserError(f"{flag}: no valid image folder in '{root}'{found}. Put images in subfolders named "
                        "'<repeats>_<class tokens>', e.g. '{root}/10_sks dog'".replace("{root}", root))
    return subsets
