"""KS dataset flags and TOML keys: the parser against KS's `add_dataset_arguments`, fine-tuning metadata (JSON /
JSONL captions and tags, --in_json, metadata_file subsets), --dataset_repeats, --caption_extention, new TOML keys,
refusals and notes, --resize_interpolation, --debug_dataset."""
import argparse
import math
import json
import os

import numpy as np
import pytest
from PIL import Image

from library import train_util
from library.data import DatasetOptions, build_dataset_group
from library.data.dataset_config import resolve_datasets
from library.data.images import load_rgb
from library.data.loader import batch_steps
from library.errors import UserError

# KS library/train_util.py add_dataset_arguments(parser, True, True, True), as train_network.py calls it:
# name -> (type, default, choices). alpha_mask belongs to the mask options and is checked there.
KS_DATASET_FLAGS = {
    "train_data_dir": (str, None, None), "cache_info": ("store_true", False, None),
    "shuffle_caption": ("store_true", False, None), "caption_separator": (str, ",", None),
    "caption_extension": (str, ".caption", None), "caption_extention": (str, None, None),
    "keep_tokens": (int, 0, None), "keep_tokens_separator": (str, "", None), "secondary_separator": (str, None, None),
    "enable_wildcard": ("store_true", False, None), "caption_prefix": (str, None, None),
    "caption_suffix": (str, None, None), "color_aug": ("store_true", False, None),
    "flip_aug": ("store_true", False, None), "face_crop_aug_range": (str, None, None),
    "random_crop": ("store_true", False, None), "debug_dataset": ("store_true", False, None),
    "resolution": (str, None, None), "cache_latents": ("store_true", False, None), "vae_batch_size": (int, 1, None),
    "cache_latents_to_disk": ("store_true", False, None), "skip_cache_check": ("store_true", False, None),
    "enable_bucket": ("store_true", False, None), "min_bucket_reso": (int, 256, None),
    "max_bucket_reso": (int, 1024, None), "bucket_reso_steps": (int, 64, None),
    "bucket_no_upscale": ("store_true", False, None),
    "resize_interpolation": (str, None, ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"]),
    "token_warmup_min": (int, 1, None), "token_warmup_step": (float, 0, None), "dataset_class": (str, None, None),
    "caption_dropout_rate": (float, 0.0, None), "caption_dropout_every_n_epochs": (int, 0, None),
    "caption_tag_dropout_rate": (float, 0.0, None), "reg_data_dir": (str, None, None), "in_json": (str, None, None),
    "dataset_repeats": (int, 1, None),
}


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_every_ks_dataset_flag_has_ks_type_default_and_choices(family):
    actions = {a.dest: a for a in train_util.setup_parser(family)._actions}
    for name, (kind, default, choices) in KS_DATASET_FLAGS.items():
        action = actions[name]
        if kind == "store_true":
            assert isinstance(action, argparse._StoreTrueAction), name
        else:
            assert action.type is kind, name
        assert action.default == default and action.choices == choices, name


def write_image(path, size=(64, 64), value=100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def finetune_folder(tmp_path):
    """Images a.png, b.jpg, c.png and KS merge_*_to_metadata style JSON (stem keys) for them."""
    folder = tmp_path / "images"
    write_image(str(folder / "a.png"))
    write_image(str(folder / "b.jpg"), size=(96, 64))
    write_image(str(folder / "c.png"))
    metadata = {
        "a": {"caption": "a photo of a cat", "tags": "cat, sitting, indoors"},
        "b": {"caption": "a dog"},
        "c": {"tags": "tree, Outdoors", "train_resolution": [64, 64]},
    }
    path = tmp_path / "meta_cap_dd.json"
    path.write_text(json.dumps(metadata), encoding="utf-8")
    return str(folder), str(path)


def captions_by_name(group):
    return {os.path.basename(it.path): it.caption for it in group.items}


def test_in_json_reads_the_caption_and_tags_of_each_image(tmp_path):
    folder, meta = finetune_folder(tmp_path)
    group = build_dataset_group(DatasetOptions(train_data_dir=folder, in_json=meta, resolution="64",
                                               dataset_repeats=3))
    # KS: caption + caption_separator + tags (no space added), either part may be missing.
    assert captions_by_name(group) == {"a.png": "a photo of a cat,cat, sitting, indoors", "b.jpg": "a dog",
                                       "c.png": "tree, Outdoors"}
    assert group.num_train_images == 9 and all(it.num_repeats == 3 for it in group.items)   # --dataset_repeats
    info = group.metadata()
    # KS names the subset by the metadata file and counts only the tags (lower-cased).
    assert json.loads(info["ss_dataset_dirs"]) == {"meta_cap_dd.json": {"n_repeats": 3, "img_count": 3}}
    assert json.loads(info["ss_tag_frequency"]) == {"meta_cap_dd.json": {"cat": 1, "sitting": 1, "indoors": 1,
                                                                         "tree": 1, "outdoors": 1}}


def test_metadata_file_subsets_in_toml_jsonl_and_wildcards(tmp_path):
    folder, meta = finetune_folder(tmp_path)
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text(json.dumps({"image_path": "a.png", "caption": "one\ntwo", "tags": "x\ny"}) + "\n\n" +
                     json.dumps({"image_path": os.path.join(folder, "c.png"), "caption": "abs"}) + "\n",
                     encoding="utf-8")
    toml = tmp_path / "ds.toml"
    toml.write_text(f"""
[general]
caption_separator = ";"
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  metadata_file = '{meta}'
  image_dir = '{folder}'
  num_repeats = 2
  [[datasets.subsets]]
  metadata_file = 'meta.jsonl'
  image_dir = '{folder}'
  enable_wildcard = true
""", encoding="utf-8")
    group = build_dataset_group(DatasetOptions(dataset_config=str(toml), dataset_repeats=5))
    by_subset = [{os.path.basename(it.path): it.caption for it in group.items if it.subset_index == i}
                 for i in range(2)]
    assert by_subset[0]["a.png"] == "a photo of a cat;cat, sitting, indoors"       # TOML caption_separator
    # enable_wildcard: the tags (newlines made separators) go on every caption line (KS).
    assert by_subset[1] == {"a.png": "one;x;y\ntwo;x;y", "c.png": "abs"}
    assert [s.num_repeats for s in group.subsets] == [2, 5]      # no num_repeats: --dataset_repeats (KS)


def test_metadata_file_mistakes_name_the_file_and_key(tmp_path):
    folder, meta = finetune_folder(tmp_path)
    with pytest.raises(UserError, match="no image for key 'zzz'"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"zzz": {"caption": "x"}}), encoding="utf-8")
        build_dataset_group(DatasetOptions(train_data_dir=folder, in_json=str(bad), resolution="64"))
    with pytest.raises(UserError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("{", encoding="utf-8")
        build_dataset_group(DatasetOptions(train_data_dir=folder, in_json=str(tmp_path / "broken.json"),
                                           resolution="64"))
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match="relative path; set image_dir"):
        build_dataset_group(DatasetOptions(dataset_config=str(toml)))
    toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{meta}'\n"
                    f"image_dir = '{folder}'\nis_reg = true\n", encoding="utf-8")
    with pytest.raises(UserError, match="'is_reg' cannot be used with 'metadata_file'"):
        build_dataset_group(DatasetOptions(dataset_config=str(toml)))


def test_caption_extention_alias_wins_as_in_ks(tmp_path):
    args = train_util.parse_args("sd1", ["--caption_extention", ".txt"])
    assert DatasetOptions.from_args(args).caption_extension == ".txt"
    args = train_util.parse_args("sd1", ["--caption_extension", ".tags", "--caption_extention", ".txt"])
    assert DatasetOptions.from_args(args).caption_extension == ".txt"
    assert DatasetOptions.from_args(train_util.parse_args("sd1", [])).caption_extension == ".caption"


def test_new_toml_keys_are_typed_and_ks_keys_without_effect_are_noted_once(tmp_path, capsys):
    write_image(str(tmp_path / "img" / "1.png"))
    head = f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n"

    def resolve(extra):
        (tmp_path / "ds.toml").write_text(head + extra, encoding="utf-8")
        return resolve_datasets(DatasetOptions(dataset_config=str(tmp_path / "ds.toml")))

    sub = resolve("caption_separator = ';'\nsecondary_separator = '::'\nenable_wildcard = true\n"
                  "token_warmup_min = 3\ntoken_warmup_step = 0.5\nresize_interpolation = 'area'\n")[0].subsets[0]
    assert (sub.caption_separator, sub.secondary_separator, sub.enable_wildcard, sub.token_warmup_min,
            sub.token_warmup_step, sub.resize_interpolation) == (";", "::", True, 3, 0.5, "area")
    for line, key in (("enable_wildcard = 1", "enable_wildcard"), ("caption_separator = ''", "caption_separator"),
                      ("token_warmup_step = -1", "token_warmup_step"),
                      ("resize_interpolation = 'sinc'", "resize_interpolation")):
        with pytest.raises(UserError, match=f"'{key}'"):
            resolve(line + "\n")
    capsys.readouterr()
    resolve("cache_info = true\ncustom_attributes = {a = 1}\n")
    resolve("cache_info = true\n")
    out = capsys.readouterr().out
    assert out.count("note: dataset TOML key 'cache_info' has no effect") == 1
    assert out.count("'custom_attributes' has no effect") == 1
    with pytest.raises(UserError, match="network_multiplier = 0.5.*not supported"):
        (tmp_path / "ds.toml").write_text("[general]\nnetwork_multiplier = 0.5\n" + head, encoding="utf-8")
        resolve_datasets(DatasetOptions(dataset_config=str(tmp_path / "ds.toml")))
    with pytest.raises(UserError, match="caption_extention.*did you mean 'caption_extension'"):
        resolve("caption_extention = '.txt'\n")


def test_refused_flags_stop_before_any_file_is_read(tmp_path):
    missing = str(tmp_path / "nothing_here")
    with pytest.raises(UserError, match="--face_crop_aug_range: not supported"):
        build_dataset_group(DatasetOptions(train_data_dir=missing, resolution="64", face_crop_aug_range="2.0,4.0"))
    with pytest.raises(UserError, match="--dataset_class .*--dataset_config"):
        build_dataset_group(DatasetOptions(train_data_dir=missing, resolution="64", dataset_class="my.Data"))
    with pytest.raises(UserError, match="--vae_batch_size"):
        build_dataset_group(DatasetOptions(train_data_dir=missing, resolution="64", vae_batch_size=0))
    with pytest.raises(UserError, match="--caption_separator"):
        write_image(str(tmp_path / "t" / "1_x" / "a.png"))
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t"), resolution="64", caption_separator=""))


def test_resize_interpolation_selects_the_filter(tmp_path):
    path = str(tmp_path / "t" / "1_x" / "a.png")
    os.makedirs(os.path.dirname(path))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
    images = {}
    for name in ("nearest", "area", None):
        group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t"), resolution="64",
                                                   resize_interpolation=name))
        images[name] = group.load_batch([0], 1, 0, augment=False)["images"][0]
    expected = {name: np.asarray(load_rgb(path).resize((64, 64), flt))
                for name, flt in (("nearest", Image.Resampling.NEAREST), ("area", Image.Resampling.BOX),
                                  (None, Image.Resampling.LANCZOS))}
    for name, image in images.items():
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        assert np.array_equal(pixels, expected[name]), name
    assert not np.array_equal(expected["nearest"], expected["area"])


def test_batch_steps_follow_gradient_accumulation_and_resume():
    # 7 batches, accumulation 3: steps 0,0,0,1,1,1,2 (the last step of the epoch takes one batch).
    assert batch_steps(10, 0, 3, 7) == [10, 10, 10, 11, 11, 11, 12]
    # Resumed 4 batches into the epoch with 11 steps done: the rest of the same schedule.
    assert batch_steps(11, 4, 3, 3) == [11, 11, 12]
    assert batch_steps(0, 0, 1, 3) == [0, 1, 2]


@pytest.mark.slow
def test_debug_dataset_prints_the_first_epoch_and_loads_no_model(tmp_path, capsys):
    for name in ("a", "b", "c", "d"):
        write_image(str(tmp_path / "t" / "1_x" / f"{name}.png"))
        (tmp_path / "t" / "1_x" / f"{name}.caption").write_text("t1, t2, t3, t4, t5", encoding="utf-8")
    os.makedirs(tmp_path / "model")
    (tmp_path / "model" / "model_index.json").write_text("{}")     # a model folder without any weights
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir",
            str(tmp_path / "t"), "--resolution", "64", "--output_dir", str(tmp_path / "out"), "--debug_dataset",
            "--token_warmup_step", "2", "--gradient_accumulation_steps", "2"]
    from library.families import get_adapter
    from library.training_loop import train
    code = train_util.run_cli(lambda args: train(args, get_adapter("sd1")), "sd1", argv)
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("batch ")]
    assert len(lines) == 4
    # Batches 0,1 train in step 0 and 2,3 in step 1 (accumulation 2): warmup 1 tag, then 3 (floor(1 * 4 / 2) + 1).
    assert [line.split(" | ")[0] for line in lines] == ["batch 0 step 0", "batch 1 step 0", "batch 2 step 1",
                                                        "batch 3 step 1"]
    assert [line.split("caption: ")[1].count(",") + 1 for line in lines] == [1, 1, 3, 3]
    assert not os.path.exists(tmp_path / "out" / "last.safetensors")


@pytest.mark.slow
def test_ks_caption_recipe_trains_and_resumes_bit_exact(tmp_path, monkeypatch):
    """A tiny SD1.5 run on --in_json captions with wildcards, token warmup, shuffling, flip-cached latents and
    gradient accumulation: captions grow with the optimizer step as KS's formula says, and a run resumed from
    its step-3 state ends with the same LoRA bit for bit."""
    import glob

    import torch
    from tests.train_helpers import base_argv, lora_tensors, make_images, run_inprocess, save_tiny_sd15
    from library import training_loop

    model = save_tiny_sd15(str(tmp_path / "model"))
    images = tmp_path / "images"
    make_images(str(images), 4, caption=None)
    tags = ", ".join(f"t{i}" for i in range(7))
    (tmp_path / "meta.json").write_text(json.dumps(
        {f"img{i:02d}": {"caption": "{a|the} photo\nsks picture", "tags": tags} for i in range(4)}), "utf-8")
    common = dict(in_json=str(tmp_path / "meta.json"), enable_wildcard=True, token_warmup_step=3,
                  token_warmup_min=2, shuffle_caption=True, keep_tokens=1, flip_aug=True, cache_latents=True,
                  vae_batch_size=2, gradient_accumulation_steps=2, save_every_n_steps=3, save_state=True)
    seen = []
    real = training_loop._forward_backward
    monkeypatch.setattr(training_loop, "_forward_backward",
                        lambda run, batch, micro: seen.append((run.state.step, batch["captions"][0])) or
                        real(run, batch, micro))
    full = run_inprocess("sd1", base_argv(model, str(images), str(tmp_path / "full"), steps=6, **common))
    assert len(seen) == 12                                             # 6 steps x 2 accumulated batches
    for step, caption in seen:
        kept, *free = caption.split(", ")                              # keep_tokens=1: the chosen line stays first
        assert kept in ("a photo", "the photo", "sks picture")
        # "line,t0, ..., t6": the line is the kept tag, 7 free tags: floor(s * (7 - 2) / 3) + 2 before step 3.
        assert len(free) == (math.floor(step * 5 / 3) + 2 if step < 3 else 7), (step, caption)
    assert {c.split(", ")[0] for _, c in seen} >= {"sks picture"}
    state = glob.glob(str(tmp_path / "full" / "*3-state"))
    assert len(state) == 1
    seen.clear()
    resumed = run_inprocess("sd1", base_argv(model, str(images), str(tmp_path / "resumed"), steps=6,
                                             resume=state[0], **common))
    assert [s for s, _ in seen] == [3, 3, 4, 4, 5, 5]
    a, b = lora_tensors(full), lora_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
