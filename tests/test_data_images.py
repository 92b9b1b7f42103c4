"""Folder discovery, image checks, captions and the pixels handed to the VAE."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from lib_ti.data import DataError, DatasetSpec, SubsetSpec, load_pixels, scan, subsets_from_train_dir


def img(path, size=(64, 64), color=(200, 20, 20), mode="RGB", caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def test_flat_folder_is_one_subset(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "notes").mkdir()  # not N_name: ignored
    subs = subsets_from_train_dir(tmp_path, flip_aug=True)
    assert subs == [SubsetSpec(image_dir=str(tmp_path), flip_aug=True)]


def test_kohya_repeat_folders(tmp_path):
    img(tmp_path / "10_dog" / "a.png")
    img(tmp_path / "3_sks cat" / "b.png")
    img(tmp_path / "misc" / "c.png")  # ignored, as in kohya
    subs = subsets_from_train_dir(tmp_path, shuffle_caption=True)
    assert [(s.num_repeats, s.class_tokens, s.shuffle_caption) for s in subs] == [(10, "dog", True),
                                                                                 (3, "sks cat", True)]
    reg = subsets_from_train_dir(tmp_path, is_reg=True)
    assert all(s.is_reg for s in reg)


def test_root_images_beside_kohya_folders_are_kept(tmp_path):
    img(tmp_path / "5_dog" / "a.png")
    img(tmp_path / "b.png")
    subs = subsets_from_train_dir(tmp_path)
    assert [(s.image_dir, s.num_repeats) for s in subs] == [(str(tmp_path), 1), (str(tmp_path / "5_dog"), 5)]


def test_missing_folder_and_unknown_option(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        subsets_from_train_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="colour_aug"):
        subsets_from_train_dir(tmp_path, colour_aug=True)


def test_scan_skips_corrupt_files_and_reads_captions(tmp_path):
    img(tmp_path / "a.png", caption="  sks dog, grass \n second line")
    img(tmp_path / "B.JPG", size=(80, 48))
    img(tmp_path / "c.webp", mode="RGBA", color=(0, 0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = Image.new("RGB", (64, 64))
    good.save(tmp_path / "trunc.jpg")
    data = (tmp_path / "trunc.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "readme.md").write_text("not an image")
    res = scan(DatasetSpec([SubsetSpec(str(tmp_path), class_tokens="dog")], resolution=(64, 64)))
    names = [p.split("/")[-1] for p in (it.path for it in res.items)]
    assert names == ["B.JPG", "a.png", "c.webp"]
    assert sorted(p.split("/")[-1] for p, _ in res.skipped) == ["broken.png", "trunc.jpg"]
    assert all(reason for _, reason in res.skipped)
    by = {n: it for n, it in zip(names, res.items)}
    assert by["a.png"].caption == "sks dog, grass"  # first line, stripped (kohya)
    assert by["B.JPG"].caption == "dog"  # no caption file: class_tokens
    assert by["B.JPG"].size == (80, 48)


def test_scan_with_nothing_left_names_the_bad_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"x\.png"):
        scan(DatasetSpec([SubsetSpec(str(tmp_path))]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        scan(DatasetSpec([SubsetSpec(str(tmp_path / "empty"))]))
    with pytest.raises(DataError, match="does not exist"):
        scan(DatasetSpec([SubsetSpec(str(tmp_path / "gone"))]))


def test_caption_extension_without_dot_and_bom(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "a.caption").write_bytes("\ufefftok, red".encode())
    res = scan(DatasetSpec([SubsetSpec(str(tmp_path), caption_extension="caption")], resolution=(64, 64)))
    assert res.items[0].caption == "tok, red"


def test_pixels_range_shape_and_center_crop(tmp_path):
    # left half black, right half white: a 128x64 image center-cropped to 64x64 after no resize
    im = Image.new("RGB", (128, 64), (0, 0, 0))
    im.paste((255, 255, 255), (64, 0, 128, 64))
    im.save(tmp_path / "a.png")
    item = scan(DatasetSpec([SubsetSpec(str(tmp_path))], resolution=(64, 64))).items[0]
    assert item.bucket == (64, 64) and item.resized == (128, 64)
    px, size = load_pixels(item, random.Random(0), flip=False)
    assert px.shape == (3, 64, 64) and px.dtype == torch.float32
    assert float(px.min()) == -1.0 and float(px.max()) == 1.0
    assert float(px[:, :, 5].mean()) == -1.0 and float(px[:, :, -5].mean()) == 1.0
    assert size.original_hw == (64, 128) and size.crop_top_left == (0, 32) and size.target_hw == (64, 64)
    flipped, fsize = load_pixels(item, random.Random(0), flip=True)
    assert torch.equal(flipped, px.flip(-1))
    assert fsize.crop_top_left == (0, 128 - 32 - 64)


def test_alpha_is_flattened_onto_white(tmp_path):
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent black
    im.paste((255, 0, 0, 255), (0, 0, 32, 64))  # opaque red left half
    im.save(tmp_path / "a.png")
    item = scan(DatasetSpec([SubsetSpec(str(tmp_path))], resolution=(64, 64))).items[0]
    px, _ = load_pixels(item)
    assert torch.allclose(px[:, :, 48], torch.ones(3, 64))  # transparent -> white, not black
    assert torch.allclose(px[:, :, 8], torch.tensor([1.0, -1.0, -1.0])[:, None].expand(3, 64))


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (96, 64), (10, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown as 64 wide, 96 high
    im.save(tmp_path / "a.jpg", exif=exif)
    item = scan(DatasetSpec([SubsetSpec(str(tmp_path))], resolution=(64, 64), enable_bucket=True,
                            min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)).items[0]
    assert item.size == (64, 96)
    px, size = load_pixels(item)
    assert size.original_hw == (96, 64)
    assert px.shape[1:] == (item.bucket[1], item.bucket[0])


def test_resize_covers_and_random_crop_uses_rng(tmp_path):
    Image.effect_noise((100, 50), 64).convert("RGB").save(tmp_path / "a.png")
    sub = SubsetSpec(str(tmp_path), random_crop=True)
    item = scan(DatasetSpec([sub], resolution=(64, 64))).items[0]
    assert item.resized == (128, 64)
    crops = {load_pixels(item, random.Random(s))[1].crop_top_left for s in range(20)}
    assert len(crops) > 1 and all(t == 0 and 0 <= left <= 64 for t, left in crops)
    a, sa = load_pixels(item, random.Random(3))
    b, _ = load_pixels(item, random.Random(3))
    assert torch.equal(a, b)
    f, sf = load_pixels(item, random.Random(3), flip=True)  # same window, mirrored
    assert torch.equal(f, a.flip(-1))
    assert sf.crop_top_left == (0, 128 - sa.crop_top_left[1] - 64)
