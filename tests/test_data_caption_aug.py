"""kohya's caption keys beyond shuffle/keep_tokens: prefix/suffix, caption and tag dropout, keep-tags
separator, secondary separator, wildcards, token warmup; kohya dataset keys this trainer explains;
InvokeAI's squash resize (center_crop false)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from lib_ti.config import TrainConfig
from lib_ti.data import (
    DataError,
    DatasetSpec,
    PromptBuilder,
    SubsetSpec,
    load_dataset_toml,
    load_pixels,
    scan,
)
from lib_ti.data.captions import caption_text, captions_missing_token, dropped
from lib_ti.model import SINGLE_SLOT
from lib_ti.tokens import init_vectors
from lib_ti.train import run_training

CAP = "mytok, red, green, blue, yellow, black"


def sub(**kw) -> SubsetSpec:
    return SubsetSpec("/x", **kw)


def test_prefix_and_suffix_wrap_the_caption():
    s = sub(caption_prefix="a photo of", caption_suffix="high quality")
    assert caption_text("mytok, red", s) == "a photo of mytok, red high quality"
    assert caption_text("", sub(caption_prefix="mytok")) == "mytok"


def test_caption_dropout_rate_empties_about_that_share():
    s = sub(caption_dropout_rate=0.3)
    rng = random.Random(1)
    share = sum(dropped(s, rng) for _ in range(2000)) / 2000
    assert 0.2 < share < 0.4
    assert not any(dropped(sub(), rng) for _ in range(100))


def test_caption_dropout_every_n_epochs_counts_epochs_from_one():
    s = sub(caption_dropout_every_n_epochs=3)
    rng = random.Random(0)
    assert [dropped(s, rng, epoch=e) for e in range(1, 7)] == [False, False, True, False, False, True]
    assert not dropped(s, rng)  # no epoch known (dataset preview): not applied


def test_dropped_prompt_is_empty_in_every_prompt_mode():
    item = type("I", (), {"caption": CAP, "subset": sub(caption_dropout_every_n_epochs=1)})()
    for mode in ("caption", "object", "style"):
        assert PromptBuilder("mytok", mode).build(item, random.Random(0), epoch=1) == ""
        assert PromptBuilder("mytok", mode).fixed(item) != ""  # the validation prompt never drops


def test_tag_dropout_drops_flexible_tags_only():
    s = sub(caption_tag_dropout_rate=0.5, keep_tokens=1)
    outs = [caption_text(CAP, s, random.Random(i)) for i in range(200)]
    assert all(o.startswith("mytok") for o in outs)
    lengths = [len(o.split(", ")) for o in outs]
    assert min(lengths) < 6 and 2 < sum(lengths) / len(lengths) < 5  # 1 kept + about half of 5
    assert caption_text(CAP, sub(caption_tag_dropout_rate=1.0, keep_tokens=1), random.Random(0)) == "mytok"


def test_keep_tokens_separator_fixes_head_and_tail():
    s = sub(shuffle_caption=True, keep_tokens_separator="|||")
    cap = "mytok, style ||| a, b, c, d ||| tail1, tail2"
    outs = {caption_text(cap, s, random.Random(i)) for i in range(30)}
    assert len(outs) > 1
    for o in outs:
        tags = o.split(", ")
        assert tags[:2] == ["mytok", "style"] and tags[-2:] == ["tail1", "tail2"] and "|||" not in o
    # without shuffling the separator still never reaches the prompt
    assert caption_text(cap, sub(keep_tokens_separator="|||")) == "mytok, style, a, b, c, d, tail1, tail2"


def test_secondary_separator_keeps_a_group_together():
    s = sub(shuffle_caption=True, secondary_separator=";;;", keep_tokens=1)
    outs = [caption_text("mytok, blue;;;sky, tree", s, random.Random(i)) for i in range(20)]
    assert all("blue,sky" in o for o in outs)  # shuffled as one tag, then joined by caption_separator


def test_wildcards_and_lines():
    s = sub(enable_wildcard=True)
    outs = {caption_text("mytok, {red|green|blue} hat\nmytok, tall", s, random.Random(i)) for i in range(60)}
    assert outs == {"mytok, red hat", "mytok, green hat", "mytok, blue hat", "mytok, tall"}
    assert caption_text("mytok {{literal}}", s, random.Random(0)) == "mytok {literal}"
    assert caption_text("mytok, {red|green}\nsecond", s, augment=False) in ("mytok, red", "mytok, green")
    assert caption_text("first\nsecond", sub()) == "first"  # without wildcards, the first line (kohya)


def test_token_warmup_shows_more_tags_over_the_steps():
    s = sub(token_warmup_min=1, token_warmup_step=0.5, keep_tokens=1)  # a fraction of max_steps
    n = [len(caption_text(CAP, s, random.Random(0), step=k, max_steps=100).split(", ")) for k in (0, 25, 49, 50)]
    assert n == [2, 4, 5, 6]  # 1 kept tag + 1 at the start, all 5 flexible ones from step 50
    assert caption_text(CAP, s, random.Random(0)) == CAP  # step unknown: warmup off


def test_captions_missing_token_counts_the_prefix():
    s = sub(caption_prefix="mytok")
    items = [type("I", (), {"caption": "red disc", "subset": s, "path": "a"})(),
             type("I", (), {"caption": "red disc", "subset": sub(), "path": "b"})()]
    assert captions_missing_token(items, "mytok") == ["b"]


def _toml(tmp_path, general: str) -> str:
    (tmp_path / "img").mkdir(exist_ok=True)
    p = tmp_path / "d.toml"
    p.write_text(f'[general]\n{general}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n')
    return str(p)


def test_dataset_toml_takes_kohya_caption_keys(tmp_path):
    spec = load_dataset_toml(_toml(tmp_path, 'caption_dropout_rate = 0.1\ncaption_tag_dropout_rate = 0\n'
                                              'caption_prefix = "mytok"\nkeep_tokens_separator = "|||"\n'
                                              'token_warmup_step = 0.5\nenable_wildcard = true\ncache_info = true\n'
                                              'color_aug = false\nnetwork_multiplier = 1.0'))
    s = spec.subsets[0]
    assert (s.caption_dropout_rate, s.caption_tag_dropout_rate, s.caption_prefix) == (0.1, 0.0, "mytok")
    assert s.keep_tokens_separator == "|||" and s.token_warmup_step == 0.5 and s.enable_wildcard


@pytest.mark.parametrize("line, needle", [("color_aug = 1", "true or false"),
                                          ("face_crop_aug_range = [4.0, 2.0]", "0 < low <= high"),
                                          ("caption_dropout_rate = 2.0", "0.0..1.0"),
                                          ('caption_prefix = 3', "a string")])
def test_dataset_toml_refuses_with_the_reason(tmp_path, line, needle):
    with pytest.raises(DataError) as e:
        load_dataset_toml(_toml(tmp_path, line))
    assert needle in str(e.value) and line.split(" =")[0] in str(e.value)


def test_center_crop_false_squashes_the_whole_image(tmp_path):
    img = Image.new("RGB", (128, 64), (0, 0, 0))
    img.paste((255, 255, 255), (96, 0, 128, 64))  # the right quarter is white
    img.save(tmp_path / "a.png")
    subset = SubsetSpec(str(tmp_path))
    crop = scan(DatasetSpec([subset], resolution=(64, 64))).items[0]
    squash = scan(DatasetSpec([subset], resolution=(64, 64), center_crop=False)).items[0]
    assert crop.resized == (128, 64) and squash.resized == squash.bucket == (64, 64)
    px_crop, _ = load_pixels(crop)
    px_squash, size = load_pixels(squash)
    assert size.crop_top_left == (0, 0) and px_squash.shape == (3, 64, 64)
    # the white quarter survives squashing (16 of 64 columns) but is cut off by the center crop
    assert px_squash[:, :, -8:].mean() > 0.9 and px_crop[:, :, -8:].mean() < -0.9


@pytest.mark.slow
def test_the_training_loop_passes_epochs_to_caption_dropout(tiny_sd1, tmp_path):
    """Every epoch dropped: no prompt names the token, so the vectors never move; every second epoch
    dropped: the first epoch trains."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 30 * i, 30)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of mytok123")
    base = dict(token_string="mytok123", init_word="ball", train_data_dir=str(data), resolution="64",
                max_train_steps=2, train_batch_size=2, learning_rate="0.05", validation_every_n_steps=0, seed=1)
    start = init_vectors(tiny_sd1, "ball", 1)[SINGLE_SLOT]
    always = run_training(TrainConfig.from_dict({**base, "caption_dropout_every_n_epochs": 1}), tiny_sd1)
    assert always.step == 2 and torch.equal(always.embedding.vectors[SINGLE_SLOT], start)
    second = run_training(TrainConfig.from_dict({**base, "caption_dropout_every_n_epochs": 2}), tiny_sd1)
    assert (second.embedding.vectors[SINGLE_SLOT] - start).abs().max() > 1e-4
