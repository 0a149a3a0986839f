"""KS fine-tuning metadata: captions and tags per image from a JSON (or JSONL) file, for `metadata_file` subsets
and `--in_json`.

Formats (KS `FineTuningDataset`, written by KS's finetune/merge_captions_to_metadata.py and
merge_dd_tags_to_metadata.py):
  JSON:  {"<image key>": {"caption": "...", "tags": "tag1, tag2", ...}, ...}
  JSONL: one {"image_path": "<image key>", "caption": "...", "tags": "..."} per line
An image key is an absolute path, or a path relative to the subset's `image_dir`. KS's tools write the file stem
("img_001", without extension) unless asked for full paths; a key that is not a file is looked up with each image
extension (KS finds such images only through latents cached by prepare_buckets_latents.py). Other fields
(`image_size`, `train_resolution`) are ignored: every image is probed anyway.

Caption of an entry, as KS: the caption, then caption_separator, then the tags (either may be missing). With
enable_wildcard the tags (newlines made separators) are appended to every non-empty line of the caption.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from library.data.blueprint import SubsetConfig
from library.data.folders import IMAGE_EXTENSIONS
from library.errors import UserError


@dataclass(frozen=True)
class MetadataEntry:
    path: str               # the image file
    caption: str            # caption and tags combined as KS does
    tags: str | None        # the tags alone (KS counts these for ss_tag_frequency)


def read_metadata(path: str) -> dict[str, dict]:
    """{image key: {"caption", "tags", ...}} from a KS JSON or JSONL metadata file; UserError naming the file."""
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            if path.endswith(".jsonl"):
                metadata = {}
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or "image_path" not in record:
                        raise UserError(f"metadata_file '{path}' line {number}: expected an object with "
                                        "'image_path' (and 'caption' / 'tags')")
                    metadata[record["image_path"]] = {k: v for k, v in record.items() if k != "image_path"}
                return metadata
            metadata = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"metadata_file '{path}' is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"metadata_file '{path}' is not UTF-8 text; re-save it as UTF-8") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
        raise UserError(f"metadata_file '{path}': expected a JSON object {{image key: {{\"caption\": ..., "
                        "\"tags\": ...}}}} as KS's finetune tools write it")
    return metadata


def combine_caption_and_tags(caption: str | None, tags: str | None, subset: SubsetConfig) -> str:
    """KS: caption + caption_separator + tags; with enable_wildcard the tags go on every caption line."""
    caption = caption or ""
    if not tags:
        return caption
    if subset.enable_wildcard:
        tags = tags.replace("\n", subset.caption_separator)
        lines = [line for line in caption.split("\n") if line.strip()]
        # KS leaves an empty caption with tags empty here; the tags alone are what the user meant.
        return "\n".join(f"{line}{subset.caption_separator}{tags}" for line in lines) if lines else tags
    return caption + subset.caption_separator + tags if caption else tags


def _image_file(key: str, subset: SubsetConfig) -> str:
    if os.path.isabs(key):
        path = key
    elif subset.image_dir:
        path = os.path.join(subset.image_dir, key)
    else:
        raise UserError(f"metadata_file '{subset.metadata_file}': image key '{key}' is a relative path; set "
                        "image_dir (or --train_data_dir with --in_json) to the folder of the images")
    if os.path.isfile(path):
        return path
    for extension in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if os.path.isfile(path + extension):
            return path + extension
    raise UserError(f"metadata_file '{subset.metadata_file}': no image for key '{key}' (looked for '{path}' and "
                    f"'{path}' + {', '.join(IMAGE_EXTENSIONS)}); fix image_dir or remove the entry")


def metadata_entries(subset: SubsetConfig) -> list[MetadataEntry]:
    """The images, captions and tags of a metadata_file subset, sorted by image path."""
    metadata = read_metadata(subset.metadata_file)
    if not metadata:
        raise UserError(f"metadata_file '{subset.metadata_file}' has no image entries")
    entries = []
    for key, record in metadata.items():
        caption, tags = record.get("caption"), record.get("tags")
        for name, value in (("caption", caption), ("tags", tags)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"metadata_file '{subset.metadata_file}': '{name}' of '{key}' must be a string, "
                                f"got {value!r}")
        entries.append(MetadataEntry(path=_image_file(key, subset),
                                     caption=combine_caption_and_tags(caption, tags, subset),
                                     tags=tags or None))
    return sorted(entries, key=lambda e: e.path)
