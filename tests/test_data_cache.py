"""Latent and text-encoder output caches: reuse, invalidation (VAE key, image file, bucket), batches, flag rules."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from library.data import CacheStats, DatasetOptions, build_dataset_group, make_dataloader
from library.data.images import load_rgb, pixels_to_tensor_batch, resize_and_crop
from library.errors import UserError


class CountingEncoder:
    """A stand-in VAE: 8x average pooling, counting how many images it encoded."""

    def __init__(self):
        self.count = 0

    def __call__(self, images):
        self.count += images.shape[0]
        return torch.nn.functional.avg_pool2d(images, 8)


def make_root(tmp_path, sizes=((64, 64), (96, 64), (64, 64))):
    folder = tmp_path / "train" / "1_sks"
    os.makedirs(folder, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 40 * i + 20, np.uint8)).save(folder / f"{i}.png")
    return str(tmp_path / "train"), folder


def build(root, resolution="64", **kw):
    return build_dataset_group(DatasetOptions(train_data_dir=root, resolution=resolution, enable_bucket=True,
                                              min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, **kw))


def test_memory_cache_fills_batches_with_latents(tmp_path):
    root, _ = make_root(tmp_path)
    group = build(root, train_batch_size=2)
    encoder = CountingEncoder()
    stats = group.cache_latents(encoder, to_disk=False, cache_key="vae-a", batch_size=2, device="cpu")
    assert (stats.computed, stats.reused, encoder.count) == (3, 0, 3)
    group.set_epoch(1)
    for batch in make_dataloader(group):
        assert batch["images"] is None
        item = group.items[batch["item_indices"][0].item()]
        assert batch["latents"].shape[1:] == (3, item.bucket_wh[1] // 8, item.bucket_wh[0] // 8)
        # The cached latent is the encoding of the centre-cropped image.
        pixels = [np.asarray(resize_and_crop(load_rgb(group.items[i].path), group.items[i].resized_wh,
                                             group.items[i].bucket_wh, group.items[i].center_crop_left_top))
                  for i in batch["item_indices"].tolist()]
        expected = torch.nn.functional.avg_pool2d(pixels_to_tensor_batch(pixels), 8)
        assert torch.allclose(batch["latents"], expected)
    assert group.cache_latents(encoder, False, "vae-a").computed == 0        # same key: nothing to do
    assert group.cache_latents(encoder, False, "vae-b").computed == 3        # new VAE: all again


def test_disk_cache_is_reused_and_invalidated_by_key_image_and_bucket(tmp_path):
    root, folder = make_root(tmp_path)
    encoder = CountingEncoder()
    first = build(root).cache_latents(encoder, True, "vae-a", 4, "cpu")
    assert (first.computed, first.reused) == (3, 0)
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    assert len(files) == 3 and all(n.split("_")[0] in {"0", "1", "2"} for n in files)
    with safe_open(str(folder / files[0]), "pt") as f:
        meta = f.metadata()
    assert meta["cache_key"] == "vae-a" and meta["bucket_wh"] and meta["image_mtime_ns"]

    again = build(root)                                                  # a new run, nothing changed
    assert again.cache_latents(encoder, True, "vae-a", 4, "cpu") == CacheStats(computed=0, reused=3)
    assert encoder.count == 3
    batch = again.load_batch([0], 1, 0)
    assert batch["images"] is None and batch["latents"].shape == (1, 3, 8, 8)

    # Another VAE (cache_key) -> recompute everything.
    assert build(root).cache_latents(encoder, True, "vae-b", 4, "cpu").computed == 3

    # One image file changed (content and mtime) -> only it is recomputed.
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(folder / "0.png")
    os.utime(folder / "0.png", ns=(1_000_000_000, 1_000_000_000))
    changed = build(root)
    assert changed.cache_latents(encoder, True, "vae-a", 4, "cpu") == CacheStats(computed=1, reused=2)
    item0 = [it for it in changed.items if it.path.endswith("0.png")][0]
    assert changed.load_batch([item0.index], 1, 0)["latents"].mean() > 0.9   # the new, brighter image

    # Another resolution -> other buckets -> recompute.
    assert build(root, resolution="128").cache_latents(encoder, True, "vae-a", 4, "cpu").computed == 3


def test_stale_file_with_same_name_is_not_trusted(tmp_path):
    root, folder = make_root(tmp_path, sizes=((64, 64),))
    encoder = CountingEncoder()
    group = build(root)
    group.cache_latents(encoder, True, "vae-a", 1, "cpu")
    path = group.items[0].latents_path
    # Same file name, metadata from another image state (size field edited): recomputed, not loaded.
    with safe_open(path, "pt") as f:
        meta, tensor = f.metadata(), f.get_tensor("latents")
    from safetensors.torch import save_file
    save_file({"latents": tensor * 0}, path, metadata={**meta, "image_size_bytes": "1"})
    assert build(root).cache_latents(encoder, True, "vae-a", 1, "cpu").computed == 1
    with open(path, "wb") as f:                                           # a torn file is a miss too
        f.write(b"\x00\x01")
    assert build(root).cache_latents(encoder, True, "vae-a", 1, "cpu").computed == 1


@pytest.mark.parametrize("flag", ["random_crop", "color_aug"])
def test_pixel_augmentations_and_cached_latents_are_refused(tmp_path, flag):
    root, _ = make_root(tmp_path)
    with pytest.raises(UserError) as e:
        build(root, cache_latents=True, **{flag: True})
    assert "--cache_latents" in str(e.value) and f"--{flag}" in str(e.value)
    group = build(root, **{flag: True})
    with pytest.raises(UserError, match=f"--cache_latents.*--{flag}"):
        group.cache_latents(CountingEncoder(), False, "k")


def expected_latents(group, item, flipped):
    pixels = np.asarray(resize_and_crop(load_rgb(item.path), item.resized_wh, item.bucket_wh,
                                        item.center_crop_left_top))
    images = pixels_to_tensor_batch([pixels[:, ::-1] if flipped else pixels])
    return torch.nn.functional.avg_pool2d(images, 8)[0]


@pytest.mark.parametrize("to_disk", [False, True])
def test_flip_aug_caches_both_flips_and_batches_take_the_drawn_one(tmp_path, to_disk):
    # Images with a left-right gradient, so a flipped latent differs from the unflipped one.
    folder = tmp_path / "train" / "1_sks"
    os.makedirs(folder)
    for i, (w, h) in enumerate(((64, 64), (96, 64), (64, 64), (64, 96))):
        ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None] * np.ones((h, 1, 3)) * (0.5 + 0.1 * i)
        Image.fromarray(ramp.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    group = build(str(tmp_path / "train"), flip_aug=True, cache_latents=True)
    encoder = CountingEncoder()
    stats = group.cache_latents(encoder, to_disk=to_disk, cache_key="vae-a", batch_size=3, device="cpu")
    assert (stats.computed, encoder.count) == (4, 8)              # every image encoded plain and mirrored
    for item in group.items:
        tensors = ({"latents": item.latents, "latents_flipped": item.latents_flipped} if not to_disk else
                   {k: safe_open(item.latents_path, "pt").get_tensor(k) for k in ("latents", "latents_flipped")})
        assert torch.allclose(tensors["latents"], expected_latents(group, item, False), atol=1e-6)
        assert torch.allclose(tensors["latents_flipped"], expected_latents(group, item, True), atol=1e-6)
        assert not torch.allclose(tensors["latents"], tensors["latents_flipped"])
    # Each sample gets the latent of its flip draw: over 40 epochs both occur, about half each, and the latent
    # matches the one the same draw gives to the uncached pixel pipeline (the crop_top_lefts agree too).
    uncached = build(str(tmp_path / "train"), flip_aug=True)
    expected = {it.index: (expected_latents(group, it, False), expected_latents(group, it, True))
                for it in group.items}
    flipped_count = total = 0
    for epoch in range(1, 41):
        for number, indices in enumerate(group.make_batches(epoch)):
            batch = group.load_batch(indices, epoch, number)
            if epoch <= 2:
                pixels = uncached.load_batch(indices, epoch, number)
                assert torch.allclose(batch["latents"], torch.nn.functional.avg_pool2d(pixels["images"], 8),
                                      atol=1e-5)
                assert torch.equal(batch["crop_top_lefts"], pixels["crop_top_lefts"])
            for i, index in enumerate(indices):
                plain, mirrored = expected[index]
                is_flipped = torch.allclose(batch["latents"][i], mirrored, atol=1e-6)
                assert is_flipped or torch.allclose(batch["latents"][i], plain, atol=1e-6)
                flipped_count += int(is_flipped)
                total += 1
    assert total == 160 and 50 < flipped_count < 110           # Binomial(160, 0.5): mean 80, sd 6.3
    if to_disk:  # a later run without flip_aug does not trust the file written with it, and vice versa
        assert build(str(tmp_path / "train")).cache_latents(encoder, True, "vae-a").computed == 4
        again = build(str(tmp_path / "train"), flip_aug=True).cache_latents(encoder, True, "vae-a")
        assert again.computed == 4


def test_vae_batch_size_sets_images_per_encoder_call(tmp_path):
    root, _ = make_root(tmp_path, sizes=((64, 64),) * 5)
    calls = []
    encode = lambda images: (calls.append(images.shape[0]), CountingEncoder()(images))[1]   # noqa: E731
    build(root).cache_latents(encode, False, "k", batch_size=2)
    assert calls == [2, 2, 1]


def test_skip_cache_check_reuses_existing_files_unchecked(tmp_path):
    root, folder = make_root(tmp_path, sizes=((64, 64),))
    encoder = CountingEncoder()
    build(root).cache_latents(encoder, True, "vae-a", 1, "cpu")
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(folder / "0.png")   # the image changes
    os.utime(folder / "0.png", ns=(1_000_000_000, 1_000_000_000))
    skipping = build(root, skip_cache_check=True)
    assert skipping.cache_latents(encoder, True, "vae-a", 1, "cpu") == CacheStats(computed=0, reused=1)
    assert skipping.load_batch([0], 1, 0)["latents"].mean() < 0                      # the old, dark latents
    assert build(root).cache_latents(encoder, True, "vae-a", 1, "cpu").computed == 1  # checked: recomputed
    os.remove(skipping.items[0].latents_path)                       # existence is always checked (KS)
    assert build(root, skip_cache_check=True).cache_latents(encoder, True, "vae-a", 1, "cpu").computed == 1


def encode_text(captions):
    lengths = torch.tensor([float(len(c)) for c in captions])
    return {"hidden": lengths[:, None, None].expand(-1, 3, 2).clone(), "pooled": lengths[:, None] * 2}


def test_text_encoder_outputs_cached_and_stacked(tmp_path):
    root, folder = make_root(tmp_path)
    (folder / "0.txt").write_text("a long caption here", encoding="utf-8")
    group = build(root, caption_prefix="pre")
    stats = group.cache_text_encoder_outputs(encode_text, to_disk=False, cache_key="te")
    assert stats.computed == 3
    item0 = [it for it in group.items if it.path.endswith("0.png")][0]
    batch = group.load_batch([item0.index], 1, 0)
    outputs = batch["text_encoder_outputs"]
    assert outputs["hidden"].shape == (1, 3, 2) and outputs["pooled"].shape == (1, 1)
    assert outputs["pooled"].item() == 2 * len("pre a long caption here")
    assert batch["captions"] == ["pre a long caption here"]


def test_text_encoder_disk_cache_follows_the_caption(tmp_path):
    root, folder = make_root(tmp_path)
    assert build(root).cache_text_encoder_outputs(encode_text, True, "te").computed == 3
    assert build(root).cache_text_encoder_outputs(encode_text, True, "te").reused == 3
    (folder / "1.txt").write_text("new caption", encoding="utf-8")
    group = build(root)
    assert group.cache_text_encoder_outputs(encode_text, True, "te") == CacheStats(computed=1, reused=2)
    item1 = [it for it in group.items if it.path.endswith("1.png")][0]
    assert group.load_batch([item1.index], 1, 0)["text_encoder_outputs"]["pooled"].item() == 2 * len("new caption")
    assert build(root).cache_text_encoder_outputs(encode_text, True, "te-other").computed == 3


@pytest.mark.parametrize("flag, value", [("shuffle_caption", True), ("caption_dropout_rate", 0.1),
                                         ("caption_tag_dropout_rate", 0.1), ("caption_dropout_every_n_epochs", 2)])
def test_text_encoder_cache_needs_deterministic_captions(tmp_path, flag, value):
    root, _ = make_root(tmp_path)
    group = build(root, **{flag: value})
    assert not group.captions_are_deterministic()
    with pytest.raises(UserError) as e:
        group.cache_text_encoder_outputs(encode_text, False, "te")
    assert "--cache_text_encoder_outputs" in str(e.value) and f"--{flag}" in str(e.value)
    with pytest.raises(UserError, match=f"--cache_text_encoder_outputs.*--{flag}"):   # at build, before models load
        build(root, cache_text_encoder_outputs=True, **{flag: value})
    assert build(root, keep_tokens=1, caption_prefix="p").captions_are_deterministic()
