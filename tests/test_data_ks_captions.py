"""KS caption options: caption_separator, secondary_separator, enable_wildcard (multi-line, {a|b}), token warmup,
keep_tokens_separator; seeded, so every number here is reproducible."""
import math
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from library.data import DatasetOptions, SubsetConfig, build_dataset_group
from library.data.captions import (caption_has_choices, process_caption, raw_caption, warmup_steps,
                                   warmup_tag_count)
from library.data.randomness import data_rng
from library.errors import UserError


def subset(**kw):
    return SubsetConfig(image_dir="x", **kw)


def draws(sub, caption, n, epoch=1, **kw):
    return [process_caption(caption, sub, epoch, data_rng(0, "caption", epoch, i, 0), **kw) for i in range(n)]


# ---- wildcards ----------------------------------------------------------------------------------------------------
def test_wildcard_picks_each_option_uniformly_and_independently_per_draw():
    out = draws(subset(enable_wildcard=True), "a {red|green|blue} {cat|dog}", 6000)
    pairs = Counter(tuple(c.split()[1:]) for c in out)
    assert set(pairs) == {(c, a) for c in ("red", "green", "blue") for a in ("cat", "dog")}
    # 6 equally likely pairs: each 1000 expected, sd = sqrt(6000 * 1/6 * 5/6) = 28.9; 5 sd = 144.
    assert all(abs(count - 1000) < 144 for count in pairs.values())
    assert all(c.startswith("a ") for c in out)


def test_wildcard_oracle_for_fixed_seeds_and_literal_braces():
    sub = subset(enable_wildcard=True)
    # The stream contract: after the dropout uniform, wildcards draw from a child generator of the sample's
    # generator (seed, "caption", epoch, batch, position); pinned for i = 0..5 so a change of stream shows.
    oracle = []
    for i in range(6):
        rng = data_rng(0, "caption", 1, i, 0)
        rng.random()
        oracle.append("xyz"[int(rng.spawn(1)[0].integers(3))])
    assert draws(sub, "{x|y|z}", 6) == oracle == ["z", "z", "y", "z", "y", "x"]
    # `{{` / `}}` are literal braces (KS); an unterminated `{` stays as it is.
    assert draws(sub, "{{style}} {a|a} {open", 1) == ["{style} a {open"]
    # No randomness (validation, cached text-encoder outputs): the first option of each wildcard.
    assert process_caption("{x|y} and {p|q}", sub, 1, None) == "x and p"
    # Without enable_wildcard the braces are kept verbatim, as KS.
    assert draws(subset(), "{x|y}", 1) == ["{x|y}"]


def test_multiline_caption_picks_a_random_line_with_wildcards_else_the_first(tmp_path):
    image = str(tmp_path / "img.png")
    (tmp_path / "img.caption").write_text("first, line\n\nsecond {a|b}\nthird\n", encoding="utf-8")
    assert raw_caption(image, subset(enable_wildcard=True)) == "first, line\nsecond {a|b}\nthird"
    assert raw_caption(image, subset()) == "first, line"                # KS: only the first line
    out = Counter(draws(subset(enable_wildcard=True, caption_prefix="p"), "one\ntwo {a|b}\nthree", 3000))
    assert set(out) == {"p one", "p two a", "p two b", "p three"}
    # Lines uniform (1000 each, 5 sd = 129); the wildcard splits its line's share.
    assert abs(out["p one"] - 1000) < 129 and abs(out["p three"] - 1000) < 129
    assert abs(out["p two a"] + out["p two b"] - 1000) < 129
    assert caption_has_choices("a\nb") and caption_has_choices("{a|b}") and not caption_has_choices("{{a}} b")


def test_wildcard_choices_do_not_shift_the_shuffle_of_the_same_draw():
    sub_plain = subset(shuffle_caption=True)
    sub_wild = subset(shuffle_caption=True, enable_wildcard=True)
    tags = "t0, t1, t2, t3, t4, t5"
    # Same uniforms for the shuffle whether or not wildcards were drawn first.
    assert draws(sub_plain, tags, 20) == draws(sub_wild, tags, 20)


# ---- separators ---------------------------------------------------------------------------------------------------
def test_caption_separator_splits_tags_and_secondary_separator_joins_words_of_one_tag():
    out = draws(subset(shuffle_caption=True, caption_separator=";"), "a; b; c", 300)
    assert {tuple(sorted(c.split(", "))) for c in out} == {("a", "b", "c")}   # KS rejoins with ", "
    assert len(set(out)) == 6
    sub = subset(shuffle_caption=True, secondary_separator=";;;")
    out = draws(sub, "sks, black;;;white dress, smile", 300)
    # "black;;;white dress" moves as one tag and becomes "black,white dress" afterwards (KS).
    assert {tuple(sorted(c.split(", "))) for c in out} == {("black,white dress", "sks", "smile")}
    assert process_caption("x;;;y", subset(secondary_separator=";;;"), 1, None) == "x,y"


def test_keep_tokens_separator_with_custom_caption_separator():
    sub = subset(shuffle_caption=True, caption_separator="|", keep_tokens_separator="|||")
    out = draws(sub, "sks|dog ||| a|b|c ||| end", 200)
    assert all(c.startswith("sks, dog, ") and c.endswith(", end") for c in out)
    assert {tuple(sorted(c.split(", ")[2:5])) for c in out} == {("a", "b", "c")}


# ---- token warmup -------------------------------------------------------------------------------------------------
def test_token_warmup_tag_count_per_step_is_ks_formula():
    # KS: floor(step * (n - min) / warmup) + min before the warmup step, then all n.
    assert [warmup_tag_count(10, s, 2, 8) for s in range(11)] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]
    assert [warmup_tag_count(5, s, 1, 10) for s in range(0, 12, 2)] == [1, 1, 2, 3, 4, 5]
    assert warmup_steps(0.25, 100) == 25 and warmup_steps(0.3, 10) == 3 and warmup_steps(40, 1000) == 40
    sub = subset(token_warmup_min=1, token_warmup_step=0.5, keep_tokens=1)
    caption = ", ".join(f"t{i}" for i in range(9))                      # 1 kept + 8 free tags
    counts = [len(process_caption(caption, sub, 1, data_rng(0, "c", s), step=s, max_train_steps=16).split(", "))
              for s in range(10)]
    # warmup = floor(0.5 * 16) = 8 steps; free tags floor(s * 7 / 8) + 1; plus the kept tag.
    assert counts == [2, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    # Without shuffling the first tags are kept in order; with it, a permutation of those same tags.
    assert process_caption(caption, sub, 1, data_rng(0, "c", 3), step=3, max_train_steps=16) == "t0, t1, t2, t3"
    shuffled = subset(token_warmup_min=1, token_warmup_step=8, keep_tokens=1, shuffle_caption=True)
    out = [process_caption(caption, shuffled, 1, data_rng(0, "c", i), step=3) for i in range(50)]
    assert {tuple(sorted(c.split(", ")[1:])) for c in out} == {("t1", "t2", "t3")} and len(set(out)) > 1


def write_image(path, size=(64, 64)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(path)


def test_token_warmup_grows_captions_with_the_step_of_the_batch(tmp_path):
    write_image(str(tmp_path / "t" / "1_x" / "a.png"))
    (tmp_path / "t" / "1_x" / "a.caption").write_text("a, b, c, d, e, f, g", encoding="utf-8")
    group = build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t"), resolution="64",
                                               token_warmup_min=2, token_warmup_step=5))
    counts = [len(group.load_batch([0], 1, 0, step=s)["captions"][0].split(", ")) for s in range(7)]
    assert counts == [2 + math.floor(s * 5 / 5) for s in range(5)] + [7, 7]
    # Token warmup changes captions with the step, so cached text-encoder outputs are refused (KS).
    with pytest.raises(UserError, match="--token_warmup_step"):
        build_dataset_group(DatasetOptions(train_data_dir=str(tmp_path / "t"), resolution="64",
                                           token_warmup_step=5, cache_text_encoder_outputs=True))


def test_wildcard_captions_refuse_text_encoder_cache_only_when_they_have_choices(tmp_path):
    write_image(str(tmp_path / "t" / "1_x" / "a.png"))
    caption = tmp_path / "t" / "1_x" / "a.caption"
    caption.write_text("plain caption {{braces}}", encoding="utf-8")
    options = dict(train_data_dir=str(tmp_path / "t"), resolution="64", enable_wildcard=True,
                   cache_text_encoder_outputs=True)
    build_dataset_group(DatasetOptions(**options))
    caption.write_text("a {cat|dog}", encoding="utf-8")
    with pytest.raises(UserError, match="--enable_wildcard"):
        build_dataset_group(DatasetOptions(**options))
