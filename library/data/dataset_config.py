"""Dataset definitions: the KS dataset TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`) or the
`--train_data_dir` / `--reg_data_dir` folders, resolved into `DatasetConfig`s.

Precedence for every key (KS `config_util.BlueprintGenerator`): subset -> dataset -> general -> command line ->
KS default. Unlike KS, TOML values are type-checked here, and unknown keys are errors that name the key, the
table, and the closest valid key.
"""
from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import fields, replace
from typing import Any, Callable

from library.data.blueprint import DatasetConfig, SubsetConfig
from library.data.folders import require_dir, subsets_from_folders
from library.data.options import DatasetOptions, note_once, parse_resolution
from library.errors import UserError, unknown_key_message

logger = logging.getLogger(__name__)

# ---- key tables ------------------------------------------------------------------------------------------------
# Subset keys that may also be set on a dataset or in [general] (KS "ascendable").
SUBSET_ASCENDABLE_KEYS = (
    "num_repeats", "class_tokens", "caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
    "caption_separator", "secondary_separator", "enable_wildcard", "token_warmup_min", "token_warmup_step",
    "caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "caption_prefix",
    "caption_suffix", "flip_aug", "random_crop", "color_aug", "resize_interpolation", "alpha_mask",
    "conditioning_data_dir",
)
SUBSET_ONLY_KEYS = ("image_dir", "is_reg", "is_val", "metadata_file")
DATASET_KEYS = (
    "resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
    "bucket_no_upscale", "validation_split", "validation_seed",
)
# KS keys accepted for compatibility that change nothing here; each is noted once when set (see NOTED_KEYS).
NOTED_KEYS = {
    "cache_info": "the image scan is always redone (sizes and captions are read up front and checked)",
    "custom_attributes": "only KS's Flux trainer reads them (diff_output_preservation); the SD trainers ignore "
                         "them, as in KS",
    "network_multiplier": "1.0 is KS's default (other values, per-dataset LoRA multipliers, are refused)",
}
GENERAL_TABLE_KEYS = SUBSET_ASCENDABLE_KEYS + DATASET_KEYS
DATASET_TABLE_KEYS = GENERAL_TABLE_KEYS + ("subsets",)
SUBSET_TABLE_KEYS = SUBSET_ASCENDABLE_KEYS + SUBSET_ONLY_KEYS
TOP_LEVEL_KEYS = ("general", "datasets")
# Where each noted key may stand (KS schema): cache_info / custom_attributes on subsets (ascendable),
# network_multiplier on datasets and [general].
NOTED_SUBSET_KEYS = ("cache_info", "custom_attributes")
NOTED_DATASET_KEYS = ("network_multiplier",)
# KS keys for features this trainer does not have: a specific message instead of "unknown key".
KS_UNSUPPORTED_KEYS = (
    "face_crop_aug_range",
)
KS_UNSUPPORTED_REASONS = {
    "face_crop_aug_range": "it needs face boxes in the image file names written by KS's face-detection tool; crop "
                           "the images around the faces beforehand, or use random_crop",
}
# Keys KS does not allow on metadata_file (fine-tuning) subsets: they describe DreamBooth folders.
DREAMBOOTH_ONLY_KEYS = ("is_reg", "class_tokens")
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")
# Command-line flag names that differ from the TOML key (KS ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME).
FLAG_FOR_KEY = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}


# ---- value checks: each returns the normalised value or raises UserError naming the key -----------------------
COMMAND_LINE = "command line"


def _type_error(key: str, where: str, expected: str, value: Any) -> UserError:
    if where == COMMAND_LINE:
        return UserError(f"--{FLAG_FOR_KEY.get(key, key)}: must be {expected}, got {value!r}")
    return UserError(f"{where}: '{key}' must be {expected}, got {value!r}")


def _boolean(key: str, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, where, "true or false", value)
    return value


def _integer(minimum: int | None) -> Callable[[str, Any, str], int]:
    def check(key: str, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, where, "an integer", value)
        if minimum is not None and value < minimum:
            raise _type_error(key, where, f"an integer >= {minimum}", value)
        return value
    return check


def _rate(upper_inclusive: bool) -> Callable[[str, Any, str], float]:
    def check(key: str, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, where, "a number", value)
        ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
        if not ok:
            raise _type_error(key, where, "in [0, 1]" if upper_inclusive else "in [0, 1)", value)
        return float(value)
    return check


def _positive_number(key: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _type_error(key, where, "a number >= 0", value)
    return float(value)


def _text(key: str, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _type_error(key, where, "a string", value)
    return value


def _separator(key: str, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _type_error(key, where, "a non-empty string", value)
    return value


def _optional_separator(key: str, value: Any, where: str) -> str | None:
    return None if value is None or value == "" else _separator(key, value, where)


def _interpolation(key: str, value: Any, where: str) -> str | None:
    if value is not None and value not in RESIZE_INTERPOLATIONS:
        raise _type_error(key, where, "one of " + ", ".join(RESIZE_INTERPOLATIONS), value)
    return value


def _optional_text(key: str, value: Any, where: str) -> str | None:
    return None if value is None else _text(key, value, where)


def _optional_integer(key: str, value: Any, where: str) -> int | None:
    return None if value is None else _integer(None)(key, value, where)


def _resolution(key: str, value: Any, where: str) -> tuple[int, int]:
    return parse_resolution(value, flag="--resolution" if where == COMMAND_LINE else f"{where}: '{key}'")


CHECKS: dict[str, Callable[[str, Any, str], Any]] = {
    "image_dir": _text, "is_reg": _boolean, "is_val": _boolean,
    "num_repeats": _integer(1), "class_tokens": _optional_text, "caption_extension": _text,
    "shuffle_caption": _boolean, "keep_tokens": _integer(0), "keep_tokens_separator": _text,
    "caption_separator": _separator, "secondary_separator": _optional_separator, "enable_wildcard": _boolean,
    "token_warmup_min": _integer(0), "token_warmup_step": _positive_number,
    "resize_interpolation": _interpolation, "metadata_file": _text,
    "caption_dropout_rate": _rate(True), "caption_tag_dropout_rate": _rate(True),
    "caption_dropout_every_n_epochs": _integer(0), "caption_prefix": _optional_text,
    "caption_suffix": _optional_text, "flip_aug": _boolean, "random_crop": _boolean, "color_aug": _boolean,
    "resolution": _resolution, "batch_size": _integer(1), "enable_bucket": _boolean,
    "min_bucket_reso": _integer(1), "max_bucket_reso": _integer(1), "bucket_reso_steps": _integer(1),
    "bucket_no_upscale": _boolean, "validation_split": _rate(False), "validation_seed": _optional_integer,
    "alpha_mask": _boolean, "conditioning_data_dir": _optional_text,
}


# ---- TOML loading -----------------------------------------------------------------------------------------------
def load_dataset_toml(path: str) -> dict[str, Any]:
    """Parse and check the structure and every key of a dataset TOML; values are type-checked later."""
    where = f"--dataset_config {path}"
    if not os.path.isfile(path):
        raise UserError(f"--dataset_config: file '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
    _check_keys(config, TOP_LEVEL_KEYS, where, "the top level")
    general = config.get("general", {})
    if not isinstance(general, dict):
        raise UserError(f"{where}: 'general' must be a table: [general]")
    _check_keys(general, GENERAL_TABLE_KEYS, where, "[general]")
    datasets = config.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise UserError(f"{where}: needs at least one [[datasets]] table with [[datasets.subsets]] in it")
    for d_i, dataset in enumerate(datasets, start=1):
        d_where = f"{where} [[datasets]] #{d_i}"
        _check_keys(dataset, DATASET_TABLE_KEYS, where, f"[[datasets]] #{d_i}")
        subsets = dataset.get("subsets")
        if not isinstance(subsets, list) or not subsets or not all(isinstance(s, dict) for s in subsets):
            raise UserError(f"{d_where}: needs at least one [[datasets.subsets]] table with an image_dir")
        for s_i, subset in enumerate(subsets, start=1):
            s_where = f"{d_where} [[datasets.subsets]] #{s_i}"
            _check_keys(subset, SUBSET_TABLE_KEYS, where, f"[[datasets]] #{d_i} [[datasets.subsets]] #{s_i}")
            if "metadata_file" in subset:
                for key in DREAMBOOTH_ONLY_KEYS:
                    if key in subset:
                        raise UserError(f"{s_where}: '{key}' cannot be used with 'metadata_file' (KS fine-tuning "
                                        "subsets take captions and tags from the metadata file); remove one")
            elif "image_dir" not in subset:
                raise UserError(f"{s_where}: 'image_dir' is required (the folder of this subset's images), or "
                                "'metadata_file' (KS fine-tuning captions JSON)")
    return config


def _check_keys(table: dict[str, Any], valid: tuple[str, ...], where: str, location: str) -> None:
    """`where` names the file (message prefix); `location` the table, e.g. "[[datasets]] #1"."""
    noted = NOTED_SUBSET_KEYS + (NOTED_DATASET_KEYS if "subsets" in valid or location == "[general]" else ())
    for key in table:
        if key in valid:
            continue
        if key in noted:
            _check_noted_key(key, table[key], where, location)
            continue
        if key in KS_UNSUPPORTED_KEYS:
            reason = KS_UNSUPPORTED_REASONS.get(key, "this trainer does not support it")
            raise UserError(f"{where}: key '{key}' in {location} is a kohya sd-scripts feature that is not "
                            f"supported here: {reason}; remove it")
        if key in CHECKS:  # a valid key in the wrong table
            home = "[[datasets.subsets]]" if key in SUBSET_ONLY_KEYS else "[[datasets]] or [general]"
            raise UserError(f"{where}: key '{key}' is not allowed in {location}; it belongs in {home}")
        raise UserError(f"{where}: " + unknown_key_message(key, valid, location))


def _check_noted_key(key: str, value: Any, where: str, location: str) -> None:
    """KS keys that change nothing here: checked as KS types them, then noted once per run."""
    if key == "cache_info":
        _boolean(key, value, f"{where} {location}")
    elif key == "custom_attributes" and not isinstance(value, dict):
        raise _type_error(key, f"{where} {location}", "a table", value)
    elif key == "network_multiplier":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, f"{where} {location}", "a number", value)
        if value != 1.0:
            raise UserError(f"{where}: network_multiplier = {value} in {location}: per-dataset LoRA multipliers are "
                            "not supported here; remove the key (1.0) or train the datasets in separate runs")
    note_once(f"dataset TOML key '{key}'", NOTED_KEYS[key])


# ---- resolution of precedence ---------------------------------------------------------------------------------
def _command_line_values(options: DatasetOptions) -> dict[str, Any]:
    """The command-line layer of the precedence, keyed by TOML key name."""
    values = {key: getattr(options, FLAG_FOR_KEY.get(key, key)) for key in GENERAL_TABLE_KEYS
              if hasattr(options, FLAG_FOR_KEY.get(key, key))}
    values.setdefault("num_repeats", 1)
    values.setdefault("class_tokens", None)
    values.setdefault("validation_split", 0.0)
    values.setdefault("validation_seed", None)
    return values


def _pick(key: str, layers: list[tuple[dict[str, Any], str]]) -> Any:
    """The first layer that sets `key`, checked with the message location of that layer."""
    for table, where in layers:
        if key in table:
            return CHECKS[key](key, table[key], where)
    raise KeyError(key)  # every key has a command-line value


def _subset(subset_table: dict[str, Any], layers: list[tuple[dict[str, Any], str]], where: str,
            prior_loss_weight: float, base_dir: str | None) -> SubsetConfig:
    layers = [(subset_table, where)] + layers
    values = {f.name: _pick(f.name, layers) for f in fields(SubsetConfig)
              if f.name not in ("image_dir", "is_reg", "is_val", "loss_weight", "metadata_file")}
    metadata_file = None
    if "metadata_file" in subset_table:
        metadata_file = _existing_path(_text("metadata_file", subset_table["metadata_file"], where), base_dir)
        if not os.path.isfile(metadata_file):
            raise UserError(f"{where}: metadata_file '{metadata_file}' does not exist; give the JSON written by "
                            "KS's finetune/merge_captions_to_metadata.py (or a .jsonl file)")
    image_dir = ""
    if "image_dir" in subset_table:
        image_dir = _existing_path(_text("image_dir", subset_table["image_dir"], where), base_dir)
        require_dir(image_dir, f"{where}: image_dir")
    if values.get("conditioning_data_dir"):  # like image_dir: beside the TOML too
        values["conditioning_data_dir"] = _existing_path(values["conditioning_data_dir"], base_dir)
    is_reg = _boolean("is_reg", subset_table.get("is_reg", False), where)
    is_val = _boolean("is_val", subset_table.get("is_val", False), where)
    return SubsetConfig(image_dir=image_dir, is_reg=is_reg, is_val=is_val, metadata_file=metadata_file,
                        loss_weight=prior_loss_weight if is_reg else 1.0, **values)


def _existing_path(path: str, base_dir: str | None) -> str:
    """KS resolves a relative path against the working folder; if nothing is there, also try the TOML's folder."""
    if base_dir and not os.path.isabs(path) and not os.path.exists(path):
        beside_toml = os.path.join(base_dir, path)
        if os.path.exists(beside_toml):
            return beside_toml
    return path


def _dataset(subsets: list[SubsetConfig], layers: list[tuple[dict[str, Any], str]], where: str) -> DatasetConfig:
    values = {key: _pick(key, layers) for key in DATASET_KEYS}
    config = DatasetConfig(subsets=tuple(subsets), **values)
    check_bucket_settings(config, where)
    return config


def check_bucket_settings(config: DatasetConfig, where: str) -> None:
    """KS checks: min_bucket_reso <= resolution <= max_bucket_reso when bucketing."""
    width, height = config.resolution
    if config.enable_bucket:
        where = "--min_bucket_reso / --max_bucket_reso" if where == COMMAND_LINE else where
        if config.min_bucket_reso > config.max_bucket_reso:
            raise UserError(f"{where}: min_bucket_reso ({config.min_bucket_reso}) is larger than max_bucket_reso "
                            f"({config.max_bucket_reso}); swap them")
        if min(width, height) < config.min_bucket_reso:
            raise UserError(f"{where}: min_bucket_reso ({config.min_bucket_reso}) must be <= the resolution "
                            f"{width}x{height}; lower --min_bucket_reso")
        if max(width, height) > config.max_bucket_reso:
            raise UserError(f"{where}: max_bucket_reso ({config.max_bucket_reso}) must be >= the resolution "
                            f"{width}x{height}; raise --max_bucket_reso")
        for key in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(config, key) % config.bucket_reso_steps:
                logger.warning("%s: %s %d is not divisible by bucket_reso_steps %d; buckets are still multiples of "
                               "the steps", where, key, getattr(config, key), config.bucket_reso_steps)


def resolve_datasets(options: DatasetOptions) -> list[DatasetConfig]:
    """The datasets to train on: from --dataset_config if given, else from --train_data_dir / --reg_data_dir."""
    cli = _command_line_values(options)
    cli_layer = (cli, COMMAND_LINE)
    if options.dataset_config:
        if options.train_data_dir or options.reg_data_dir or options.in_json:
            logger.warning("--dataset_config is given: --train_data_dir, --reg_data_dir and --in_json are ignored "
                           "(as KS)")
        config = load_dataset_toml(options.dataset_config)
        base_dir = os.path.dirname(os.path.abspath(options.dataset_config))
        where = f"--dataset_config {options.dataset_config}"
        general_layer = (config.get("general", {}), f"{where} [general]")
        datasets = []
        for d_i, table in enumerate(config["datasets"], start=1):
            d_where = f"{where} [[datasets]] #{d_i}"
            layers = [(table, d_where), general_layer, cli_layer]
            subsets = [_subset(s, layers, f"{d_where} [[datasets.subsets]] #{s_i}", options.prior_loss_weight,
                               base_dir)
                       for s_i, s in enumerate(table["subsets"], start=1)]
            datasets.append(_dataset(subsets, layers, d_where))
        return datasets

    if not options.train_data_dir:
        raise UserError("--train_data_dir: required (a folder of '<repeats>_<class tokens>' subfolders), "
                        "or give --dataset_config ds.toml")
    if options.in_json:  # KS "training with captions": one fine-tuning subset, captions from the JSON
        if options.reg_data_dir:
            logger.warning("--in_json is given: --reg_data_dir is ignored (as KS; fine-tuning datasets have no "
                           "regularisation images)")
        subset_table = {"image_dir": options.train_data_dir, "metadata_file": options.in_json}
        subset = _subset(subset_table, [cli_layer], "--in_json", options.prior_loss_weight, None)
        return [_dataset([subset], [cli_layer], COMMAND_LINE)]
    template_values = {f.name: _pick(f.name, [cli_layer]) for f in fields(SubsetConfig)
                       if f.name not in ("image_dir", "is_reg", "is_val", "loss_weight", "num_repeats",
                                         "class_tokens", "metadata_file")}
    template = SubsetConfig(image_dir="", **template_values)
    train = subsets_from_folders(options.train_data_dir, template, "--train_data_dir")
    reg: list[SubsetConfig] = []
    if options.reg_data_dir:
        prior_loss_weight = _positive_number("prior_loss_weight", options.prior_loss_weight, COMMAND_LINE)
        # --conditioning_data_dir holds the masks of the training images; regularisation images have none
        reg = subsets_from_folders(options.reg_data_dir, replace(template, is_reg=True, loss_weight=prior_loss_weight,
                                                                 conditioning_data_dir=None), "--reg_data_dir")
    return [_dataset(train + reg, [cli_layer], "command line")]
