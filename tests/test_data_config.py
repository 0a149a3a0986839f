"""Folders `<repeats>_<class tokens>`, the dataset TOML (precedence, unknown / mistyped keys) and DatasetOptions."""
import argparse
import logging
import os

import numpy as np
import pytest
from PIL import Image

from library.data import DatasetOptions, build_dataset_group, parse_resolution
from library.data.dataset_config import resolve_datasets
from library.data.folders import parse_folder_name
from library.errors import UserError


def write_image(path, size=(64, 64), value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def write_toml(tmp_path, text):
    path = tmp_path / "ds.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- folders ------------------------------------------------------------------------------------------------------
def test_parse_folder_name_follows_ks_split_at_first_underscore():
    assert parse_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_folder_name("3_a_b") == (3, "a_b")        # KS joins the rest with '_'
    assert parse_folder_name("5_") == (5, "")
    assert parse_folder_name("dog") is None
    assert parse_folder_name("x_dog") is None
    assert parse_folder_name("0_dog") is None              # repeats < 1 is not a valid folder


def test_folders_give_repeats_class_tokens_and_reg_loss_weight(tmp_path, caplog):
    for name in ("a.png", "b.png"):
        write_image(str(tmp_path / "train" / "4_sks dog" / name))
    write_image(str(tmp_path / "train" / "no_prefix" / "c.png"))
    write_image(str(tmp_path / "reg" / "2_dog" / "r.png"))
    options = DatasetOptions(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                             prior_loss_weight=0.25, resolution="64")
    with caplog.at_level(logging.WARNING):
        group = build_dataset_group(options)
    assert "no_prefix" in caplog.text                       # KS skips it with a warning
    by_name = {os.path.basename(it.path): it for it in group.items}
    assert set(by_name) == {"a.png", "b.png", "r.png"}
    assert by_name["a.png"].caption == "sks dog" and by_name["a.png"].num_repeats == 4
    assert by_name["a.png"].loss_weight == 1.0 and not by_name["a.png"].is_reg
    reg = by_name["r.png"]
    assert reg.is_reg and reg.loss_weight == 0.25 and reg.caption == "dog"
    # KS balancing: reg samples fill up to the 2 x 4 = 8 training samples (2 from the folder, +6 by the loop).
    assert reg.num_repeats == 8
    assert group.num_train_images == 8 and group.num_reg_images == 2
    batch = group.load_batch([by_name["a.png"].index, reg.index], 1, 0)
    assert batch["loss_weights"].tolist() == [1.0, 0.25]


def test_no_valid_folder_names_the_folder_and_the_form(tmp_path):
    write_image(str(tmp_path / "train" / "dog" / "a.png"))
    with pytest.raises(UserError) as e:
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "train"), resolution="64"))
    message = str(e.value)
    assert "--train_data_dir" in message and str(tmp_path / "train") in message
    assert "'dog'" in message and "<repeats>_<class tokens>" in message


def test_missing_and_empty_folders_are_user_errors_naming_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere"):
        build_dataset_group(DatasetOptions(train_data_dir=missing, resolution="64"))
    os.makedirs(tmp_path / "train" / "3_cat")
    (tmp_path / "train" / "3_cat" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="3_cat.*contains no images"):
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "train"), resolution="64"))


def test_missing_resolution_and_bad_cli_values_name_the_flag(tmp_path):
    write_image(str(tmp_path / "t" / "1_x" / "a.png"))
    with pytest.raises(UserError, match="--resolution"):
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t")))
    with pytest.raises(UserError, match="--caption_dropout_rate.*1.5"):
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t"), resolution="64",
                                           caption_dropout_rate=1.5))
    with pytest.raises(UserError, match="--train_batch_size"):
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t"), resolution="64", train_batch_size=0))
    with pytest.raises(UserError, match="max_bucket_reso"):
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t"), resolution="2048",
                                           enable_bucket=True))


def test_parse_resolution_is_width_height():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution("512,768") == (512, 768)
    assert parse_resolution((640, 384)) == (640, 384)
    assert parse_resolution(1024) == (1024, 1024)
    with pytest.raises(UserError, match="--resolution"):
        parse_resolution("big")
    with pytest.raises(UserError, match="--resolution"):
        parse_resolution("1,2,3")


def test_from_args_reads_names_and_keeps_ks_defaults():
    args = argparse.Namespace(train_data_dir="d", resolution="768", shuffle_caption=True, keep_tokens=2,
                              caption_prefix=None, train_batch_size=4, unrelated_flag=1)
    options = DatasetOptions.from_args(args)
    assert (options.train_data_dir, options.resolution, options.shuffle_caption, options.keep_tokens) == \
        ("d", "768", True, 2)
    assert options.train_batch_size == 4
    # Not on the namespace -> KS defaults.
    assert options.caption_extension == ".caption" and options.bucket_reso_steps == 64
    assert options.min_bucket_reso == 256 and options.max_bucket_reso == 1024 and options.prior_loss_weight == 1.0
    assert options.data_seed == 0 and DatasetOptions(seed=7).data_seed == 7


# ---- TOML --------------------------------------------------------------------------------------------------------
def test_toml_precedence_subset_dataset_general_cli(tmp_path):
    write_image(str(tmp_path / "a" / "1.png"))
    write_image(str(tmp_path / "b" / "1.png"))
    path = write_toml(tmp_path, f"""
[general]
shuffle_caption = true
keep_tokens = 1
num_repeats = 3
resolution = 512
caption_extension = ".txt"

[[datasets]]
keep_tokens = 2
resolution = [768, 512]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  keep_tokens = 3
  class_tokens = "sks"

  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  is_reg = true
""")
    options = DatasetOptions(dataset_config=path, keep_tokens=9, caption_dropout_rate=0.1, resolution="256",
                             train_batch_size=7, prior_loss_weight=0.5, flip_aug=True)
    [dataset] = resolve_datasets(options)
    a, b = dataset.subsets
    assert a.keep_tokens == 3 and b.keep_tokens == 2          # subset > dataset > general > CLI (9)
    assert a.shuffle_caption and b.shuffle_caption            # from [general]
    assert a.num_repeats == 3 and a.caption_extension == ".txt"
    assert a.caption_dropout_rate == 0.1 and a.flip_aug       # only the CLI sets these
    assert a.class_tokens == "sks" and b.class_tokens is None
    assert dataset.resolution == (768, 512) and dataset.batch_size == 2
    assert not a.is_reg and a.loss_weight == 1.0
    assert b.is_reg and b.loss_weight == 0.5                 # --prior_loss_weight applies to TOML reg subsets


def test_toml_cli_fills_what_no_table_sets(tmp_path):
    write_image(str(tmp_path / "a" / "1.png"))
    path = write_toml(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\n")
    [dataset] = resolve_datasets(DatasetOptions(dataset_config=path, resolution="320,256", train_batch_size=3,
                                                enable_bucket=True, bucket_reso_steps=32, min_bucket_reso=128))
    assert dataset.resolution == (320, 256) and dataset.batch_size == 3 and dataset.enable_bucket
    assert dataset.bucket_reso_steps == 32 and dataset.min_bucket_reso == 128
    assert dataset.subsets[0].num_repeats == 1 and dataset.subsets[0].caption_extension == ".caption"


@pytest.mark.parametrize("table_text, key, suggestion, table", [
    ("[general]\nnum_repeat = 3\n", "num_repeat", "num_repeats", "[general]"),
    ("[[datasets]]\nbatch_sise = 3\n", "batch_sise", "batch_size", "[[datasets]]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'IMG'\nshufle_caption = true\n", "shufle_caption",
     "shuffle_caption", "[[datasets.subsets]]"),
    ("[genral]\nresolution = 512\n", "genral", "general", "top level"),
])
def test_unknown_keys_name_key_table_and_closest(tmp_path, table_text, key, suggestion, table):
    write_image(str(tmp_path / "img" / "1.png"))
    text = table_text.replace("IMG", str(tmp_path / "img"))
    if "[[datasets.subsets]]" not in text:
        text += f"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n" if "[[datasets]]" \
            not in text else f"\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n"
    with pytest.raises(UserError) as e:
        resolve_datasets(DatasetOptions(dataset_config=write_toml(tmp_path, text), resolution="64"))
    message = str(e.value)
    assert f"'{key}'" in message and f"'{suggestion}'" in message and table in message


@pytest.mark.parametrize("line, key, shown", [
    ('num_repeats = "ten"', "num_repeats", "'ten'"),
    ("shuffle_caption = 1", "shuffle_caption", "1"),
    ("caption_dropout_rate = 1.5", "caption_dropout_rate", "1.5"),
    ("keep_tokens = -1", "keep_tokens", "-1"),
    ("is_reg = 'yes'", "is_reg", "'yes'"),
])
def test_wrong_types_name_the_key_and_value(tmp_path, line, key, shown):
    write_image(str(tmp_path / "img" / "1.png"))
    path = write_toml(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n{line}\n")
    with pytest.raises(UserError) as e:
        resolve_datasets(DatasetOptions(dataset_config=path, resolution="64"))
    assert f"'{key}'" in str(e.value) and shown in str(e.value) and "[[datasets.subsets]] #1" in str(e.value)


def test_wrong_type_in_general_and_key_in_wrong_table(tmp_path):
    write_image(str(tmp_path / "img" / "1.png"))
    subset = f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n"
    with pytest.raises(UserError, match=r"\[general\].*'resolution'"):
        resolve_datasets(DatasetOptions(dataset_config=write_toml(tmp_path, "[general]\nresolution = 'big'\n" +
                                                                  subset)))
    with pytest.raises(UserError, match="'resolution' is not allowed in .*subsets.*belongs in"):
        resolve_datasets(DatasetOptions(dataset_config=write_toml(tmp_path, subset + "resolution = 512\n"),
                                        resolution="64"))
    with pytest.raises(UserError, match="'face_crop_aug_range'.*not supported here: it needs face boxes"):
        resolve_datasets(DatasetOptions(
            dataset_config=write_toml(tmp_path, subset + "face_crop_aug_range = [2.0, 4.0]\n"), resolution="64"))


def test_toml_structure_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_datasets(DatasetOptions(dataset_config=str(tmp_path / "none.toml")))
    with pytest.raises(UserError, match="not valid TOML"):
        resolve_datasets(DatasetOptions(dataset_config=write_toml(tmp_path, "[[datasets]\n")))
    with pytest.raises(UserError, match=r"\[\[datasets\]\]"):
        resolve_datasets(DatasetOptions(dataset_config=write_toml(tmp_path, "[general]\nresolution = 512\n")))
    with pytest.raises(UserError, match="'image_dir' is required"):
        resolve_datasets(DatasetOptions(dataset_config=write_toml(tmp_path, "[[datasets]]\n[[datasets.subsets]]\n"
                                                                            "num_repeats = 2\n"), resolution="64"))
    with pytest.raises(UserError, match="missing_dir.*does not exist"):
        resolve_datasets(DatasetOptions(dataset_config=write_toml(
            tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'missing_dir'}'\n"),
            resolution="64"))


def test_validation_split_and_is_val_hold_items_out_of_training(tmp_path):
    for i in range(8):
        write_image(str(tmp_path / "train" / f"{i}.png"))
    for i in range(3):
        write_image(str(tmp_path / "val" / f"{i}.png"))
    path = write_toml(tmp_path, f"""
[general]
validation_split = 0.25
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{tmp_path / "train"}'
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "val"}'
  is_val = true
""")
    group = build_dataset_group(DatasetOptions(dataset_config=path, seed=3))
    held = group.validation_items()
    assert len(held) == 2 + 3                                # round(8 * 0.25) of the split subset + all of is_val
    in_batches = {i for batch in group.make_batches(1) for i in batch}
    assert in_batches.isdisjoint({it.index for it in held})
    assert len(in_batches) == 6 and group.num_train_images == 12
    assert sorted(i for b in group.validation_batches() for i in b) == sorted(it.index for it in held)
    # The split is a function of the seed: same seed, same hold-out.
    again = build_dataset_group(DatasetOptions(dataset_config=path, seed=3))
    assert [it.path for it in again.validation_items()] == [it.path for it in held]
    with pytest.raises(UserError, match="validation_split"):
        resolve_datasets(DatasetOptions(dataset_config=write_toml(
            tmp_path, f"[general]\nvalidation_split = 1.0\n[[datasets]]\n[[datasets.subsets]]\n"
                      f"image_dir = '{tmp_path / 'train'}'\n"), resolution="64"))


def test_metadata_is_the_ks_dataset_summary(tmp_path):
    import json

    for name in ("a.png", "b.png", "c.png"):
        write_image(str(tmp_path / "train" / "5_sks dog" / name))
    (tmp_path / "train" / "5_sks dog" / "a.txt").write_text("Dog, red", encoding="utf-8")
    write_image(str(tmp_path / "reg" / "1_dog" / "r.png"))
    group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "train"), resolution="64",
                                               reg_data_dir=str(tmp_path / "reg"), train_batch_size=2))
    meta = group.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_sks dog": {"n_repeats": 5, "img_count": 3}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 1}}
    assert json.loads(meta["ss_tag_frequency"]) == {"5_sks dog": {"dog": 1, "red": 1, "sks dog": 2},
                                                    "1_dog": {"dog": 1}}
    assert meta["ss_num_train_images"] == 15 and meta["ss_num_reg_images"] == 1
    # 15 training + 15 balanced reg samples in one 64x64 bucket, batches of 2.
    assert json.loads(meta["ss_bucket_info"])["buckets"] == {"0": {"resolution": [64, 64], "count": 30}}
    assert meta["ss_num_batches_per_epoch"] == 15
