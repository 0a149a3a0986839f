"""Caption files, class-token fallback and KS caption processing (shuffle, keep_tokens, dropout, prefix/suffix)."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from library.data import DatasetOptions, SubsetConfig, build_dataset_group, subset_has_random_captions
from library.data.captions import (find_caption_file, process_caption, raw_caption, read_caption_file,
                                   tag_frequency)
from library.data.randomness import data_rng
from library.errors import UserError

TAGS = "a, b, c, d, e, f"


def subset(**kw):
    return SubsetConfig(image_dir="x", **kw)


def captions_over(sub, caption, n, epoch=1):
    return [process_caption(caption, sub, epoch, data_rng(0, "caption", epoch, i, 0)) for i in range(n)]


def test_shuffle_keeps_the_first_keep_tokens_in_place_and_permutes_the_rest():
    out = captions_over(subset(shuffle_caption=True, keep_tokens=2), TAGS, 300)
    split = [c.split(", ") for c in out]
    assert all(s[:2] == ["a", "b"] for s in split)
    assert all(sorted(s[2:]) == ["c", "d", "e", "f"] for s in split)
    # All 4! orders of the free tags occur, each about 1/24 of the time.
    orders = {tuple(s[2:]) for s in split}
    assert len(orders) == 24


def test_keep_tokens_separator_keeps_a_prefix_and_a_suffix_group():
    sub = subset(shuffle_caption=True, keep_tokens_separator="|||")
    out = captions_over(sub, "sks, dog ||| red, blue, green ||| best quality", 100)
    assert all(c.startswith("sks, dog, ") and c.endswith(", best quality") for c in out)
    assert {c.split(", ")[2] for c in out} == {"red", "blue", "green"}
    # Without shuffling the separator is removed too (KS would leave '|||' in the caption).
    assert process_caption("sks ||| red, blue", subset(keep_tokens_separator="|||"), 1, None) == "sks, red, blue"


def test_caption_dropout_rate_drops_whole_captions_at_that_rate():
    out = captions_over(subset(caption_dropout_rate=0.3), TAGS, 4000)
    dropped = np.mean([c == "" for c in out])
    # Binomial(4000, 0.3): sd = 0.0072; 5 sd = 0.036.
    assert abs(dropped - 0.3) < 0.036
    assert all(c in ("", TAGS) for c in out)


def test_tag_dropout_drops_each_free_tag_at_that_rate():
    out = captions_over(subset(caption_tag_dropout_rate=0.25, keep_tokens=1), TAGS, 2000)
    counts = [len(c.split(", ")) - 1 for c in out]             # free tags kept, out of 5
    assert all(c.startswith("a") for c in out)                 # keep_tokens are never dropped
    # Each of the 5 free tags kept with p = 0.75: mean kept 3.75, sd of the mean = sqrt(5 * .75 * .25 / 2000).
    assert abs(np.mean(counts) - 3.75) < 5 * np.sqrt(5 * 0.75 * 0.25 / 2000)
    assert [c for c in out if "b" in c.split(", ")][0].split(", ").index("b") == 1   # order kept without shuffle


def test_caption_dropout_every_n_epochs_drops_in_multiples_of_n():
    sub = subset(caption_dropout_every_n_epochs=3)
    rng = lambda e: data_rng(0, "caption", e, 0, 0)          # noqa: E731
    assert [process_caption(TAGS, sub, e, rng(e)) == "" for e in range(1, 7)] == \
        [False, False, True, False, False, True]


def test_prefix_and_suffix_are_added_before_processing():
    sub = subset(caption_prefix="photo of", caption_suffix="4k")
    assert process_caption("sks dog", sub, 1, None) == "photo of sks dog 4k"
    # KS order: prefix joins the first tag, so keep_tokens=1 keeps 'photo of a' in front.
    out = captions_over(subset(caption_prefix="photo of", shuffle_caption=True, keep_tokens=1), TAGS, 20)
    assert all(c.startswith("photo of a, ") for c in out)


def test_same_seed_epoch_index_same_caption_different_index_different():
    sub = subset(shuffle_caption=True)
    long = ", ".join(f"t{i}" for i in range(12))
    one = process_caption(long, sub, 2, data_rng(5, "caption", 2, 7, 1))
    assert one == process_caption(long, sub, 2, data_rng(5, "caption", 2, 7, 1))
    assert one != process_caption(long, sub, 3, data_rng(5, "caption", 3, 7, 1))
    assert one != process_caption(long, sub, 2, data_rng(5, "caption", 2, 8, 1))
    assert one != process_caption(long, sub, 2, data_rng(6, "caption", 2, 7, 1))


def test_random_caption_flags():
    assert not subset_has_random_captions(subset(caption_prefix="p", keep_tokens=2, keep_tokens_separator="|"))
    for kw in ({"shuffle_caption": True}, {"caption_dropout_rate": 0.1}, {"caption_tag_dropout_rate": 0.1},
               {"caption_dropout_every_n_epochs": 2}):
        assert subset_has_random_captions(subset(**kw))


def test_caption_files_bom_txt_fallback_and_class_tokens(tmp_path, caplog):
    image = str(tmp_path / "img.png")
    sub = subset(class_tokens="sks dog")
    assert raw_caption(image, sub) == "sks dog"                          # no caption file
    (tmp_path / "img.txt").write_text("from txt\n", encoding="utf-8")
    assert raw_caption(image, sub) == "from txt"                          # .caption default falls back to .txt
    (tmp_path / "img.caption").write_bytes("\ufeffwith bom, é\nsecond line\n".encode("utf-8"))
    assert raw_caption(image, sub) == "with bom, é"                       # BOM skipped, first line
    assert find_caption_file(image, ".caption").endswith("img.caption")
    assert raw_caption(image, subset(caption_extension=".tags", class_tokens="cls")) == "cls"  # no fallback
    (tmp_path / "img.caption").write_text("\n  \n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert raw_caption(image, sub) == "sks dog"                       # empty file -> class tokens, warned
    assert "img.caption" in caplog.text


def test_non_utf8_caption_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "img.caption"
    path.write_bytes("caf\u00e9, na\u00efve".encode("latin-1"))
    with pytest.raises(UserError) as e:
        read_caption_file(str(path))
    assert str(path) in str(e.value) and "UTF-8" in str(e.value)
    # ... and it stops the dataset build (before training), not a worker.
    folder = tmp_path / "t" / "1_x"
    os.makedirs(folder)
    Image.new("RGB", (64, 64)).save(folder / "img.png")
    (folder / "img.caption").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match="img.caption"):
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t"), resolution="64"))


def test_tag_frequency_is_ks_lowercase_count():
    assert tag_frequency(["Dog, red", "dog,  blue", ""]) == {"dog": 2, "red": 1, "blue": 1}
