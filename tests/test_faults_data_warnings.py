"""Issue 13 #11: data that would train silently wrong is named once, with a count: an animated GIF (not read), a
dangling symlink, a tiny image upscaled, an extreme aspect ratio mostly cropped, a caption cut by the tokenizer."""
import logging
import os

from PIL import Image

from library.data import DatasetOptions, build_dataset_group
from library.data.data_warnings import warn_about_long_captions
from library.tiny_models import make_clip_tokenizer
from tests.train_helpers import make_images


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_unused_files_tiny_and_extreme_images_are_named_once_with_a_count(tmp_path, caplog):
    folder = tmp_path / "data" / "1_x"
    make_images(str(folder), 3)
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    os.symlink(tmp_path / "gone.png", folder / "link.png")
    os.symlink(tmp_path / "gone2.png", folder / "link2.png")
    Image.new("RGB", (1, 1), "white").save(folder / "dot.png")
    Image.new("RGB", (2, 2), "white").save(folder / "dot2.png")
    Image.new("RGB", (10000, 100), "white").save(folder / "strip.png")
    with caplog.at_level(logging.WARNING):
        group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "data"), resolution="64"))
    assert group.num_train_images == 6
    messages = warnings_of(caplog)
    unused = [m for m in messages if "not used" in m]
    assert len(unused) == 1 and unused[0].startswith("1 file(s)") and "anim.gif" in unused[0]
    dangling = [m for m in messages if "point to nothing" in m]
    assert len(dangling) == 1 and dangling[0].startswith("2 symlink(s)")
    upscaled = [m for m in messages if "upscaled" in m]
    assert len(upscaled) == 1 and upscaled[0].startswith("2 of 6 images") and "dot.png 1x1 x64" in upscaled[0]
    cropped = [m for m in messages if "crop" in m]
    assert len(cropped) == 1 and cropped[0].startswith("1 of 6 images") and "strip.png 10000x100: 1% kept" in cropped[0]


def test_long_captions_are_counted(tmp_path, caplog):
    tokenizer = make_clip_tokenizer(str(tmp_path / "tok"))
    captions = {"a.png": "a photo", "b.png": " ".join(["word"] * 400), "c.png": " ".join(["x"] * 80)}
    with caplog.at_level(logging.WARNING):
        warn_about_long_captions(captions, tokenizer, 75)
    (message,) = warnings_of(caplog)
    assert message.startswith("2 of 3 images") and "75 tokens" in message
    assert "'b.png: " in message and "'c.png: " in message and "a.png" not in message
