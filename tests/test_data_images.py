"""Image decoding (modes, formats, transparency, EXIF) and bad files found by the up-front scan."""
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from library.data import DatasetOptions, build_dataset_group
from library.data.images import BadImageError, load_rgb, probe_image
from library.errors import UserError


def pixel(path, xy=(0, 0)):
    return load_rgb(str(path)).getpixel(xy)


def test_grayscale_becomes_rgb(tmp_path):
    Image.fromarray(np.full((8, 8), 100, np.uint8), "L").save(tmp_path / "g.png")
    image = load_rgb(str(tmp_path / "g.png"))
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (100, 100, 100)


def test_rgba_transparent_pixels_become_white_and_alpha_blends(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255                      # red everywhere, hidden under alpha 0 ...
    rgba[1, 1, 3] = 255                     # ... except one opaque pixel
    rgba[2, 2, 3] = 128                     # and one half-transparent one
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert pixel(tmp_path / "a.png", (0, 0)) == (255, 255, 255)
    assert pixel(tmp_path / "a.png", (1, 1)) == (255, 0, 0)
    # Over white: 255 * (1 - 128/255) = 127 in green and blue (PIL rounds to 127).
    r, g, b = pixel(tmp_path / "a.png", (2, 2))
    assert r == 255 and abs(g - 127) <= 1 and g == b


def test_la_and_palette_transparency_become_white(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)
    la[0, 1] = (30, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert pixel(tmp_path / "la.png", (0, 0)) == (255, 255, 255)
    assert pixel(tmp_path / "la.png", (1, 0)) == (30, 30, 30)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert pixel(tmp_path / "p.png", (0, 0)) == (255, 255, 255)      # index 0 is transparent blue
    assert pixel(tmp_path / "p.png", (1, 1)) == (0, 255, 0)


@pytest.mark.parametrize("ext, kwargs", [("webp", {"lossless": True}), ("bmp", {}), ("jpg", {"quality": 100}),
                                          ("jpeg", {"quality": 100})])
def test_other_formats_load(tmp_path, ext, kwargs):
    array = np.zeros((16, 24, 3), np.uint8)
    array[:, :12] = (200, 40, 10)
    array[:, 12:] = (10, 40, 200)
    Image.fromarray(array).save(tmp_path / f"i.{ext}", **kwargs)
    probe = probe_image(str(tmp_path / f"i.{ext}"))
    assert (probe.width, probe.height) == (24, 16)
    loaded = np.asarray(load_rgb(str(tmp_path / f"i.{ext}")), dtype=int)
    tolerance = 0 if ext in ("webp", "bmp") else 12
    assert np.abs(loaded[4, 3] - (200, 40, 10)).max() <= tolerance
    assert np.abs(loaded[4, 20] - (10, 40, 200)).max() <= tolerance


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, :5] = 255                                 # white stripe on the left of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 CW to display"
    Image.fromarray(array).save(tmp_path / "r.jpg", exif=exif, quality=100)
    probe = probe_image(str(tmp_path / "r.jpg"))
    assert (probe.width, probe.height) == (10, 30)     # portrait after orientation
    loaded = np.asarray(load_rgb(str(tmp_path / "r.jpg")))
    assert loaded.shape == (30, 10, 3) and loaded[:5].mean() > 200 and loaded[-5:].mean() < 50


def png_bytes(size=(32, 32)):
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buffer,
                                                                                                            "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("empty.png", b"", "empty file"),
    ("half.png", png_bytes()[:300], "truncated"),
    ("text.png", b"this is not an image at all", "not an image"),
])
def test_probe_rejects_bad_files(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadImageError, match=reason):
        probe_image(str(tmp_path / name))


def test_truncated_jpeg_is_detected(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(BadImageError, match="truncated"):
        probe_image(str(tmp_path / "t.jpg"))


def make_dataset(tmp_path, good, bad):
    folder = tmp_path / "train" / "1_x"
    os.makedirs(folder)
    for i in range(good):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(folder / f"good{i:02d}.png")
    names = []
    for i in range(bad):
        name = f"bad{i}.png"
        (folder / name).write_bytes(b"" if i % 2 == 0 else png_bytes()[:300])
        names.append(name)
    return str(tmp_path / "train"), names


def test_a_few_bad_files_are_skipped_with_a_warning_naming_each(tmp_path, caplog):
    root, bad = make_dataset(tmp_path, good=18, bad=2)               # 2 of 20 = 10%: the limit
    with caplog.at_level(logging.WARNING):
        group = build_dataset_group(DatasetOptions(train_data_dir=root, resolution="64"))
    assert len(group.items) == 18
    assert all(not it.path.endswith(tuple(bad)) for it in group.items)
    for name in bad:
        assert name in caplog.text
    assert "empty file" in caplog.text and "truncated" in caplog.text
    assert sorted(os.path.basename(p) for p, _ in group.skipped_files) == bad


def test_too_many_bad_files_stop_before_training(tmp_path):
    root, bad = make_dataset(tmp_path, good=8, bad=2)                # 2 of 10 = 20% > 10%
    with pytest.raises(UserError) as e:
        build_dataset_group(DatasetOptions(train_data_dir=root, resolution="64"))
    assert all(name in str(e.value) for name in bad) and "10%" in str(e.value)
    # The share is a parameter: allowing 25% accepts the same data.
    assert len(build_dataset_group(DatasetOptions(train_data_dir=root, resolution="64"), max_bad_share=0.25).items) == 8


def test_only_bad_files_is_a_user_error(tmp_path):
    root, _ = make_dataset(tmp_path, good=0, bad=1)
    with pytest.raises(UserError, match="bad0.png"):
        build_dataset_group(DatasetOptions(train_data_dir=root, resolution="64"), max_bad_share=1.0)
