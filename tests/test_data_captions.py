"""Tag shuffling (kohya keep_tokens), templates (kohya `{}`, A1111 `[name]`/`[filewords]`), prompts."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_ti.data import (
    A1111_TEMPLATES,
    IMAGENET_STYLE_TEMPLATES_SMALL,
    IMAGENET_TEMPLATES_SMALL,
    DataError,
    ImageItem,
    PromptBuilder,
    SubsetSpec,
    captions_missing_token,
    load_template,
    load_template_file,
    process_caption,
)

tag = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters=" -_"), min_size=1,
              max_size=8).map(str.strip).filter(bool)


def item(caption, path="a.png", **sub):
    return ImageItem(path, (64, 64), caption, SubsetSpec(".", **sub), (64, 64), (64, 64))


@settings(deadline=None, max_examples=200)
@given(st.lists(tag, min_size=0, max_size=12), st.integers(0, 15), st.integers(0, 2**32 - 1))
def test_shuffle_keeps_prefix_and_tags(tags, keep, seed):
    caption = ", ".join(tags)
    out = process_caption(caption, True, keep, ",", random.Random(seed))
    got = [t.strip() for t in out.split(",") if t.strip()]
    assert got[:keep] == tags[:keep]
    assert Counter(got) == Counter(tags)


def test_shuffle_is_seeded_and_off_means_untouched():
    cap = "tok, a, b, c, d, e, f, g"
    a = process_caption(cap, True, 1, ",", random.Random(5))
    assert a == process_caption(cap, True, 1, ",", random.Random(5))
    assert a.startswith("tok, ")
    assert len({process_caption(cap, True, 1, ",", random.Random(s)) for s in range(20)}) > 1
    assert process_caption(" tok ,a,,b ", False, 0, ",", random.Random(0)) == " tok ,a,,b "


def test_other_separator():
    out = process_caption("x|y|z", True, 3, "|", random.Random(0))
    assert out == "x| y| z"


def test_template_lists_match_kohya_and_a1111():
    assert len(IMAGENET_TEMPLATES_SMALL) == 27 and len(IMAGENET_STYLE_TEMPLATES_SMALL) == 19
    assert IMAGENET_TEMPLATES_SMALL[0] == "a photo of a {}"
    assert IMAGENET_STYLE_TEMPLATES_SMALL[-1] == "a large painting in the style of {}"
    assert A1111_TEMPLATES["subject"][9] == "a close-up photo of a [name]"
    assert A1111_TEMPLATES["subject_filewords"][0] == "a photo of a [name], [filewords]"
    assert A1111_TEMPLATES["style"][7] == "a picture, art by [name]"
    assert A1111_TEMPLATES["style_filewords"][0] == "a painting of [filewords], art by [name]"
    assert A1111_TEMPLATES["none"] == ["picture"]


def test_load_template_file_and_builtin(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("\n  [name] on a table \n\nart by [name], [filewords]\n")
    assert load_template_file(p) == ["[name] on a table", "art by [name], [filewords]"]
    assert load_template(str(p)) == load_template_file(p)
    assert load_template("style_filewords") == A1111_TEMPLATES["style_filewords"]
    assert load_template("subject.txt") == A1111_TEMPLATES["subject"]
    with pytest.raises(DataError, match="cannot read"):
        load_template(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no prompts"):
        load_template_file(tmp_path / "empty.txt")


def test_prompt_modes():
    it = item("sks, red, ball", shuffle_caption=True, keep_tokens=1)
    rng = random.Random(0)
    cap = PromptBuilder("sks", "caption").build(it, rng)
    assert cap.startswith("sks, ") and sorted(cap.split(", ")) == ["ball", "red", "sks"]
    obj = PromptBuilder("tok", "object").build(it, rng)
    assert obj in [t.format("tok") for t in IMAGENET_TEMPLATES_SMALL]
    sty = PromptBuilder("tok", "style").build(it, rng)
    assert sty in [t.format("tok") for t in IMAGENET_STYLE_TEMPLATES_SMALL]
    tpl = PromptBuilder("tok", "template", ["art by [name], [filewords]"]).build(item("red, ball"), rng)
    assert tpl == "art by tok, red, ball"
    empty = PromptBuilder("tok", "template", ["a photo of [name], [filewords]"]).build(item(""), rng)
    assert empty == "a photo of tok"
    with pytest.raises(DataError, match="mode"):
        PromptBuilder("tok", "weird")
    with pytest.raises(DataError, match=r"\[name\]"):
        PromptBuilder("tok", "template", A1111_TEMPLATES["none"])


def test_auto_uses_each_images_caption_else_the_object_template():
    b = PromptBuilder("tok", "auto")
    rng = random.Random(0)
    captioned, bare, prefixed = item("tok, red ball"), item(""), item("", caption_prefix="tok on grass")
    reg = ImageItem("r.png", (64, 64), "", SubsetSpec(".", is_reg=True), (64, 64), (64, 64))
    assert [b.source(it) for it in (captioned, bare, prefixed, reg)] == ["caption", "object", "caption", "caption"]
    assert b.build(captioned, rng) == "tok, red ball" and b.fixed(captioned) == "tok, red ball"
    assert b.build(bare, rng) in [t.format("tok") for t in IMAGENET_TEMPLATES_SMALL]
    assert b.fixed(bare) == "a photo of a tok" and b.build(prefixed, rng) == "tok on grass"
    assert b.build(reg, rng) == ""  # a regularization prompt never names the token
    assert b.uses_captions and b.captioned([captioned, bare, prefixed]) == [captioned, prefixed]
    assert PromptBuilder("tok", "object").captioned([captioned]) == []


def test_fixed_prompt_is_deterministic_and_unshuffled():
    it = item("sks, red, ball, grass", shuffle_caption=True)
    b = PromptBuilder("sks", "template", A1111_TEMPLATES["subject_filewords"])
    assert b.fixed(it) == b.fixed_prompt(it) == "a photo of a sks, sks, red, ball, grass"
    assert PromptBuilder("sks", "caption").fixed(it) == "sks, red, ball, grass"
    assert PromptBuilder("sks", "style").fixed(it) == "a painting in the style of sks"


def test_uses_captions():
    assert PromptBuilder("t", "caption").uses_captions and PromptBuilder("t", "auto").uses_captions
    assert not PromptBuilder("t", "object").uses_captions
    assert not PromptBuilder("t", "template", A1111_TEMPLATES["subject_filewords"]).uses_captions
    assert PromptBuilder("t", "template", ["[filewords]"]).uses_captions


def test_captions_missing_token_whole_word_case_insensitive():
    items = [item("a photo of SKS dog", "1.png"), item("sksdog on grass", "2.png"), item("", "3.png"),
             item("<sks>, red", "4.png"), item("sks", "5.png")]
    assert captions_missing_token(items, "sks") == ["2.png", "3.png"]
    assert captions_missing_token(items, "<sks>") == ["1.png", "2.png", "3.png", "5.png"]
