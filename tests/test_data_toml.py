"""kohya dataset TOML: precedence, relative paths, merging, and error messages that name the key."""

from __future__ import annotations

import pytest

from lib_ti.data import DataError, SubsetSpec, load_dataset_toml

DEFAULTS = dict(resolution=(512, 512), enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024,
                bucket_reso_steps=64, bucket_no_upscale=False, batch_size=1, caption_extension=".txt",
                shuffle_caption=False, keep_tokens=0, caption_separator=",", flip_aug=False, random_crop=False)


def write(tmp_path, text):
    p = tmp_path / "dataset.toml"
    p.write_text(text)
    return p


def test_precedence_subset_dataset_general_defaults(tmp_path):
    (tmp_path / "imgs").mkdir()
    p = write(tmp_path, """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"
enable_bucket = true

[[datasets]]
resolution = [768, 512]
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeats = 10
  class_tokens = "sks dog"

  [[datasets.subsets]]
  image_dir = "/abs/reg"
  is_reg = true
  keep_tokens = 0
  shuffle_caption = false
""")
    spec = load_dataset_toml(p, DEFAULTS)
    assert spec.resolution == (512, 768)  # kohya [w, h] -> (h, w)
    assert spec.batch_size == 4 and spec.enable_bucket and spec.max_bucket_reso == 1024
    a, b = spec.subsets
    assert a == SubsetSpec(str(tmp_path / "imgs"), num_repeats=10, caption_extension=".caption",
                           shuffle_caption=True, keep_tokens=2, class_tokens="sks dog")
    assert b == SubsetSpec("/abs/reg", is_reg=True, caption_extension=".caption")


def test_defaults_alone_and_int_resolution(tmp_path):
    p = write(tmp_path, '[[datasets]]\nresolution = 640\n[[datasets.subsets]]\nimage_dir = "x"\n')
    spec = load_dataset_toml(p, {**DEFAULTS, "flip_aug": True})
    assert spec.resolution == (640, 640) and spec.subsets[0].flip_aug and spec.subsets[0].image_dir == "x"


@pytest.mark.parametrize("text, where, key", [
    ('[general]\ncolour_aug = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"', "[general]",
     "colour_aug"),
    ('[[datasets]]\nreso = 512\n[[datasets.subsets]]\nimage_dir = "x"', "[[datasets]] #1", "reso"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\nrepeats = 3', "[[datasets.subsets]] #1",
     "repeats"),
    ('extra = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"', "top level", "extra"),
])
def test_unknown_keys_are_named_with_table_and_allowed(tmp_path, text, where, key):
    with pytest.raises(DataError) as e:
        load_dataset_toml(write(tmp_path, text), DEFAULTS)
    msg = str(e.value)
    assert f"'{key}'" in msg and where in msg and "allowed keys" in msg


@pytest.mark.parametrize("line, key", [
    ('num_repeats = "10"', "num_repeats"), ("flip_aug = 1", "flip_aug"), ("keep_tokens = -1", "keep_tokens"),
    ("num_repeats = 0", "num_repeats"), ("caption_extension = 3", "caption_extension"),
    ("num_repeats = true", "num_repeats"),
])
def test_wrong_types_are_named(tmp_path, line, key):
    p = write(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n{line}\n')
    with pytest.raises(DataError, match=rf"'{key}' in \[\[datasets.subsets\]\] #1"):
        load_dataset_toml(p, DEFAULTS)


def test_bad_resolution_and_structure(tmp_path):
    with pytest.raises(DataError, match="'resolution'.*width, height"):
        load_dataset_toml(write(tmp_path, '[[datasets]]\nresolution = [1, 2, 3]\n'
                                          '[[datasets.subsets]]\nimage_dir = "x"'), DEFAULTS)
    with pytest.raises(DataError, match="no \\[\\[datasets\\]\\]"):
        load_dataset_toml(write(tmp_path, "[general]\nflip_aug = true\n"), DEFAULTS)
    with pytest.raises(DataError, match="no \\[\\[datasets.subsets\\]\\]"):
        load_dataset_toml(write(tmp_path, "[[datasets]]\nbatch_size = 2\n"), DEFAULTS)
    with pytest.raises(DataError, match="needs image_dir"):
        load_dataset_toml(write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n"), DEFAULTS)
    with pytest.raises(DataError, match="not valid TOML"):
        load_dataset_toml(write(tmp_path, "[[datasets]\n"), DEFAULTS)
    with pytest.raises(DataError, match="cannot read"):
        load_dataset_toml(tmp_path / "missing.toml", DEFAULTS)


def test_multiple_datasets_merge_when_they_agree(tmp_path):
    p = write(tmp_path, """
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "b"
  is_reg = true
""")
    spec = load_dataset_toml(p, DEFAULTS)
    assert [s.image_dir for s in spec.subsets] == ["a", "b"]


def test_multiple_datasets_that_differ_are_refused(tmp_path):
    p = write(tmp_path, """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "a"
[[datasets]]
resolution = 1024
  [[datasets.subsets]]
  image_dir = "b"
""")
    with pytest.raises(DataError, match=r"differ in resolution.*dataset #1 has \(512, 512\).*one \[\[datasets\]\]"):
        load_dataset_toml(p, DEFAULTS)
