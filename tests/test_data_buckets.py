"""KS aspect-ratio buckets: the bucket list, bucket choice, resize-to-cover, crops, bucket_no_upscale, and
batches formed inside buckets."""
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from library.data import DatasetOptions, build_dataset_group
from library.data.buckets import BucketSelector, crop_offset, make_bucket_resolutions

# make_bucket_resolutions((512, 512), 256, 1024, 64) by hand: for width w = 256, 320, ..., 1024 the height is
# min(1024, floor(262144 / w / 64) * 64): 256->1024, 320->768, 384->640, 448->576, 512->512, 576->448, 640->384,
# 704->320, 768->320, 832..1024->256; both orientations, plus the square 512. 704*384 > 512^2, so (704, 384) is
# not a KS bucket (704 pairs with 320).
KS_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
          (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
          (1024, 256)]


def test_ks_bucket_list_for_512():
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert buckets == KS_512
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)


def test_sdxl_bucket_list_properties():
    buckets = make_bucket_resolutions((1024, 1024), 512, 2048, 32)
    assert (1024, 1024) in buckets and (1216, 832) in buckets and (832, 1216) in buckets
    assert all(w * h <= 1024 * 1024 and w % 32 == 0 and h % 32 == 0 and 512 <= min(w, h) for w, h in buckets)
    assert buckets == sorted(set(buckets)) and all((h, w) in buckets for w, h in buckets)


def selector(no_upscale=False, enable_bucket=True, reso=(512, 512)):
    return BucketSelector(reso, enable_bucket=enable_bucket, no_upscale=no_upscale, min_size=256, max_size=1024,
                          reso_steps=64)


@pytest.mark.parametrize("size, bucket, resized", [
    ((600, 400), (640, 384), (640, 427)),     # ar 1.5: |1.667-1.5| < |1.286-1.5|; width matched (640/600)
    ((400, 600), (384, 640), (427, 640)),
    ((1000, 1000), (512, 512), (512, 512)),
    ((640, 384), (640, 384), (640, 384)),     # its own size is a bucket
    ((3000, 700), (1024, 256), (1097, 256)),  # ar 4.29 -> widest bucket; wider than it, so heights match
    ((100, 50), (704, 320), (704, 352)),      # small images are enlarged to cover
])
def test_bucket_choice_closest_aspect_and_cover(size, bucket, resized):
    choice = selector().select(*size)
    assert choice.bucket_wh == bucket and choice.resized_wh == resized
    assert choice.resized_wh[0] >= bucket[0] and choice.resized_wh[1] >= bucket[1]
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_no_bucketing_resizes_to_cover_the_resolution():
    choice = selector(enable_bucket=False, reso=(512, 768)).select(1000, 1000)
    assert choice.bucket_wh == (512, 768) and choice.resized_wh == (768, 768)


@pytest.mark.parametrize("size, bucket, resized", [
    ((300, 200), (256, 192), (300, 200)),     # small: own size, bucket rounded down, never enlarged
    ((2000, 1000), (640, 320), (640, 320)),   # large: shrunk to area 512^2 keeping ar; height-rounding wins
    ((512, 512), (512, 512), (512, 512)),
    ((40, 100), (64, 64), (64, 160)),         # under one step: one-step bucket, enlarged to cover it
])
def test_bucket_no_upscale(size, bucket, resized):
    choice = selector(no_upscale=True).select(*size)
    assert choice.bucket_wh == bucket and choice.resized_wh == resized


def test_crop_offsets_center_and_random():
    assert crop_offset(427, 384, False, 0.99) == 21                 # KS trim_size // 2
    assert crop_offset(384, 384, True, 0.5) == 0
    offsets = {crop_offset(427, 384, True, u) for u in np.linspace(0, 0.999999, 500)}
    assert offsets == set(range(44))                                # uniform over 0..43


def make_folder(tmp_path, sizes, repeats=2, name="x"):
    folder = tmp_path / "train" / f"{repeats}_{name}"
    os.makedirs(folder, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), i * 10 % 255, np.uint8)).save(folder / f"{i:02d}.png")
    return str(tmp_path / "train")


def test_batches_stay_inside_buckets_and_use_every_repeat(tmp_path):
    sizes = [(96, 64)] * 5 + [(64, 96)] * 3 + [(64, 64)] * 4
    root = make_folder(tmp_path, sizes, repeats=3)
    # Buckets of 128x128 in steps of 32: 96x64 -> (128, 96), 64x96 -> (96, 128), 64x64 -> (128, 128).
    group = build_dataset_group(DatasetOptions(train_data_dir=root, resolution="128", enable_bucket=True,
                                               min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                                               train_batch_size=4, seed=1))
    batches = group.make_batches(1)
    for batch in batches:
        assert 1 <= len(batch) <= 4
        assert len({group.items[i].bucket_wh for i in batch}) == 1
    assert Counter(i for b in batches for i in b) == {it.index: 3 for it in group.items}
    per_bucket = Counter(group.items[b[0]].bucket_wh for b in batches)
    # 15, 9 and 12 samples per bucket -> ceil(n / 4) batches each.
    assert per_bucket == {(128, 96): 4, (96, 128): 3, (128, 128): 3}
    assert group.num_batches_per_epoch == 10
    info = group.bucket_info()
    assert sorted(b["count"] for b in info["buckets"].values()) == [9, 12, 15]
    # Order depends on (seed, epoch) only.
    assert group.make_batches(2) != batches
    again = build_dataset_group(DatasetOptions(train_data_dir=root, resolution="128", enable_bucket=True,
                                               min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                                               train_batch_size=4, seed=1))
    assert again.make_batches(1) == batches and again.make_batches(2) == group.make_batches(2)


def test_items_record_sdxl_size_conditioning(tmp_path):
    root = make_folder(tmp_path, [(600, 400)], repeats=1)
    group = build_dataset_group(DatasetOptions(train_data_dir=root, resolution="512", enable_bucket=True))
    batch = group.load_batch([0], 1, 0)
    assert batch["original_sizes"].tolist() == [[400, 600]]          # (h, w)
    assert batch["target_sizes"].tolist() == [[384, 640]]
    assert batch["crop_top_lefts"].tolist() == [[21, 0]]             # (427 - 384) // 2 from the top
    assert batch["images"].shape == (1, 3, 384, 640)
