"""The DataLoader side: batch dicts, reproducibility, resume skipping, flip / random crop bookkeeping."""
import os

import numpy as np
import torch
from PIL import Image

from library.data import DatasetOptions, build_dataset_group, make_dataloader


def make_root(tmp_path, count=6, size=(48, 32)):
    folder = tmp_path / "train" / "2_sks"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(", ".join(f"tag{i}_{j}" for j in range(6)), encoding="utf-8")
    return str(tmp_path / "train")


def options(root, **kw):
    base = dict(train_data_dir=root, resolution="32", train_batch_size=2, shuffle_caption=True,
                caption_dropout_rate=0.2, seed=11)
    base.update(kw)
    return DatasetOptions(**base)


def test_loader_yields_the_documented_batch_dict(tmp_path):
    group = build_dataset_group(options(make_root(tmp_path)))
    group.set_epoch(1)
    batches = list(make_dataloader(group))
    assert len(batches) == group.num_batches_per_epoch == 6       # 6 images x 2 repeats / batch 2
    batch = batches[0]
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (2, 3, 32, 32)
    assert -1.0 <= batch["images"].min() and batch["images"].max() <= 1.0 and batch["images"].std() > 0.3
    assert batch["latents"] is None and batch["text_encoder_outputs"] is None
    assert len(batch["captions"]) == 2 and len(batch["image_paths"]) == 2
    assert batch["loss_weights"].tolist() == [1.0, 1.0]
    for key in ("original_sizes", "crop_top_lefts", "target_sizes"):
        assert batch[key].dtype == torch.long and batch[key].shape == (2, 2)
    assert batch["original_sizes"].tolist() == [[32, 48]] * 2          # (h, w)
    assert batch["target_sizes"].tolist() == [[32, 32]] * 2
    assert batch["crop_top_lefts"].tolist() == [[0, 8]] * 2            # resized 48x32 -> crop 8 from the left


def epoch_signature(batches):
    return [(b["image_paths"], b["captions"], b["images"]) for b in batches]


def assert_same(a, b):
    assert len(a) == len(b)
    for (paths_a, caps_a, img_a), (paths_b, caps_b, img_b) in zip(a, b):
        assert paths_a == paths_b and caps_a == caps_b and torch.equal(img_a, img_b)


def test_resume_skipping_gives_the_remaining_batches_of_the_uninterrupted_epoch(tmp_path):
    root = make_root(tmp_path)
    group = build_dataset_group(options(root, flip_aug=True, random_crop=True))
    group.set_epoch(3)
    full = epoch_signature(make_dataloader(group))

    resumed = build_dataset_group(options(root, flip_aug=True, random_crop=True))   # a new process after resume
    loaded = []
    original = resumed.load_batch
    resumed.load_batch = lambda indices, epoch, number, augment=True: (loaded.append(number),
                                                                       original(indices, epoch, number, augment))[1]
    resumed.set_epoch(3)
    resumed.skip_batches(4)
    loader = make_dataloader(resumed)
    assert len(loader) == len(full) - 4
    rest = epoch_signature(loader)
    assert loaded == [4, 5]                                             # skipped batches were never loaded
    assert_same(rest, full[4:])
    # set_epoch clears the skip: the next epoch is whole.
    resumed.set_epoch(4)
    assert len(list(make_dataloader(resumed))) == len(full)


def test_epochs_differ_and_workers_do_not_change_results(tmp_path):
    group = build_dataset_group(options(make_root(tmp_path)))
    group.set_epoch(1)
    first = epoch_signature(make_dataloader(group))
    group.set_epoch(2)
    second = epoch_signature(make_dataloader(group))
    assert [s[1] for s in first] != [s[1] for s in second]               # captions / order change per epoch
    group.set_epoch(1)
    assert_same(epoch_signature(make_dataloader(group, num_workers=1)), first)


def test_caption_shuffle_and_dropout_happen_in_loaded_batches(tmp_path):
    group = build_dataset_group(options(make_root(tmp_path)))
    captions = []
    for epoch in range(1, 9):
        group.set_epoch(epoch)
        captions += [c for b in make_dataloader(group) for c in b["captions"]]
    assert any(c == "" for c in captions)                                # dropout 0.2 over 96 captions
    non_empty = [c for c in captions if c]
    assert len({c for c in non_empty if c.startswith("tag0_")}) > 1       # shuffled differently
    for caption in non_empty:                                             # a permutation of one image's tags
        image = caption.split("_")[0]
        assert sorted(caption.split(", ")) == [f"{image}_{j}" for j in range(6)]


def test_flip_mirrors_the_crop_and_records_the_mirrored_left(tmp_path):
    folder = tmp_path / "train" / "1_x"
    os.makedirs(folder)
    array = np.zeros((48, 48, 3), np.uint8)
    array[:, :16] = 255                                                   # white band on the left
    Image.fromarray(array).save(folder / "a.png")
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(folder / "b.png")   # 40x32 -> crop left 4
    group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "train"), resolution="32",
                                               flip_aug=True, seed=0))
    b_index = [it.index for it in group.items if it.path.endswith("b.png")][0]
    a_index = 1 - b_index
    seen = {}
    for batch_number in range(40):
        batch = group.load_batch([a_index, b_index], 1, batch_number)
        flipped_a = batch["images"][0, 0, :, -1].mean() > 0              # white band now on the right
        seen.setdefault(bool(flipped_a), batch["images"][0])
        left_b = batch["crop_top_lefts"][1, 1].item()
        assert left_b == 4                                                # centred crop: 4 both ways (40-32-4)
    assert set(seen) == {True, False}                                     # about half flipped
    assert torch.equal(seen[True], seen[False].flip(-1))


def test_flipped_crop_left_is_measured_in_the_mirrored_image(tmp_path):
    folder = tmp_path / "train" / "1_x"
    os.makedirs(folder)
    Image.fromarray(np.zeros((32, 41, 3), np.uint8)).save(folder / "c.png")  # 41x32: centre left 4, mirrored 5
    group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "train"), resolution="32",
                                               flip_aug=True, seed=0))
    lefts = {group.load_batch([0], 1, n)["crop_top_lefts"][0, 1].item() for n in range(30)}
    assert lefts == {4, 5}


def test_random_crop_varies_the_crop_and_covers_the_range(tmp_path):
    folder = tmp_path / "train" / "1_x"
    os.makedirs(folder)
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(folder / "c.png")  # 8 px of horizontal slack
    group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "train"), resolution="32",
                                               random_crop=True, seed=0))
    lefts = [group.load_batch([0], 1, n)["crop_top_lefts"][0].tolist() for n in range(200)]
    assert {top for top, _ in lefts} == {0} and {left for _, left in lefts} == set(range(9))


def test_color_aug_changes_some_images_only(tmp_path):
    folder = tmp_path / "train" / "1_x"
    os.makedirs(folder)
    Image.fromarray(np.full((32, 32, 3), (180, 90, 40), np.uint8)).save(folder / "c.png")
    group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "train"), resolution="32",
                                               color_aug=True, seed=0))
    plain = group.load_batch([0], 1, 0, augment=False)["images"]
    changed = [not torch.equal(group.load_batch([0], 1, n)["images"], plain) for n in range(60)]
    # KS applies colour augmentation to about a third of the samples.
    assert 8 <= sum(changed) <= 34
