"""kohya's color_aug and face_crop_aug_range on tiny real images: what they do to the pixels, that
they draw from the run's seeded RNG, where they are refused, and a tiny run with both on."""

from __future__ import annotations

import colorsys
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lib_ti.config import ConfigError, TrainConfig
from lib_ti.data import (
    DataError,
    DatasetSpec,
    LatentCache,
    SubsetSpec,
    augment,
    load_dataset_toml,
    load_pixels,
    scan,
)

FACE = (120, 70, 40, 40)  # cx, cy, w, h in a 200x160 image


def colourful(seed=0, n=24):
    """Saturated, bright pixels of every hue: their hue is well defined after uint8 rounding."""
    rs = np.random.RandomState(seed)
    hsv = np.stack([rs.uniform(0, 1, (n, n)), rs.uniform(0.5, 1, (n, n)), rs.uniform(0.5, 1, (n, n))], -1)
    rgb = np.array([[colorsys.hsv_to_rgb(*px) for px in row] for row in hsv])
    return Image.fromarray(np.rint(rgb * 255).astype(np.uint8), "RGB")


def hsv_of(img):
    a = np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255
    return np.array([colorsys.rgb_to_hsv(*px) for px in a])


def test_hue_shift_turns_hue_and_keeps_saturation_and_value():
    img = colourful()
    assert np.array_equal(np.asarray(augment.shift_hue(img, 0.0)), np.asarray(img))  # identity at 0
    before, after = hsv_of(img), hsv_of(augment.shift_hue(img, 30.0))
    turn = ((after[:, 0] - before[:, 0]) * 360 + 180) % 360 - 180  # signed, wrapped
    assert abs(np.median(turn) - 30) < 2 and np.percentile(np.abs(turn - 30), 95) < 5
    assert np.abs(after[:, 1] - before[:, 1]).max() < 0.03 and np.abs(after[:, 2] - before[:, 2]).max() < 0.01
    grey = Image.new("RGB", (4, 4), (90, 90, 90))
    assert np.array_equal(np.asarray(augment.shift_hue(grey, 50.0)), np.asarray(grey))  # no hue to turn


def test_color_aug_is_kohyas_weak_mix_and_follows_the_seed():
    img = colourful(1, 8)
    base = np.asarray(img).astype(int)

    def draws(seed):
        rng = random.Random(seed)
        return [np.asarray(augment.color_aug(img, rng)).astype(int) for _ in range(90)]

    a = draws(5)
    changed = [x for x in a if not np.array_equal(x, base)]
    assert 15 <= len(changed) <= 45  # kohya: a third of the time (fixed seed: no flakiness)
    assert max(np.abs(x - base).max() for x in changed) <= 80  # weak: +-16 degrees of hue or gamma 0.95..1.05
    assert all(np.array_equal(x, y) for x, y in zip(a, draws(5)))
    assert not all(np.array_equal(x, y) for x, y in zip(a, draws(6)))
    assert np.array_equal(np.asarray(augment.gamma(img, 1.0)), base)


def test_face_info_comes_from_the_file_name_as_in_kohya():
    assert augment.face_info("/d/photo_1_120_70_40_40.png") == (120, 70, 40, 40)
    assert augment.face_info("/d/face_120_70_40_40.jpg") == (120, 70, 40, 40)
    assert augment.face_info("/d/img0.png") is None
    assert augment.face_info("/d/img_2_3_4.png") is None  # three numbers: not a face box
    assert augment.face_info("/d/img_0_70_40_40.png") is None  # kohya: cx 0 means no face
    assert augment.face_info("/d/img_5_5_0_0.png") is None


def face_images(folder):
    """A red square 'face' on a blue ground, named with its box; and one without a name box."""
    folder.mkdir(parents=True, exist_ok=True)
    cx, cy, w, h = FACE
    img = Image.new("RGB", (200, 160), (20, 40, 200))
    ImageDraw.Draw(img).rectangle([cx - w // 2, cy - h // 2, cx + w // 2 - 1, cy + h // 2 - 1], fill=(230, 20, 20))
    img.save(folder / ("face_" + "_".join(map(str, FACE)) + ".png"))
    img.save(folder / "plain.png")
    return folder


def items_of(folder, enable_bucket=False, **subset):
    spec = DatasetSpec(subsets=[SubsetSpec(str(folder), **subset)], resolution=(64, 64), enable_bucket=enable_bucket,
                       min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32)
    return {it.path.rsplit("/", 1)[-1].split("_")[0].split(".")[0]: it for it in scan(spec).items}


def red_box(px: torch.Tensor) -> tuple[int, int, int, int]:
    red = (px[0] > 0) & (px[2] < 0)  # more red than blue, in [-1, 1]
    ys, xs = torch.nonzero(red, as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def test_face_crop_keeps_the_face_inside_at_the_asked_share(tmp_path):
    it = items_of(face_images(tmp_path / "d"), face_crop_aug_range=(2.0, 4.0))["face"]
    sides = set()
    for seed in range(8):
        px, size = load_pixels(it, random.Random(seed))
        assert px.shape == (3, 64, 64)
        top, left, bottom, right = red_box(px)
        assert top > 0 and left > 0 and bottom < 63 and right < 63  # the whole face is in the crop
        side = max(bottom - top, right - left) + 1
        assert 64 / 4 - 3 <= side <= 64 / 2 + 3  # 1/4..1/2 of the crop: 2..4 face sizes per side
        sides.add(side)
        assert size.crop_top_left == (0, 0) and size.original_hw == size.target_hw == (64, 64)  # kohya
    assert len(sides) > 2  # the scale is drawn from the range
    a, _ = load_pixels(it, random.Random(3))
    b, _ = load_pixels(it, random.Random(3))
    assert torch.equal(a, b)  # the seed decides


def test_face_crop_with_buckets_and_random_crop_gives_the_bucket(tmp_path):
    it = items_of(face_images(tmp_path / "d"), enable_bucket=True, face_crop_aug_range=(3.0, 3.0),
                  random_crop=True, flip_aug=True)["face"]
    for seed in range(4):
        px, size = load_pixels(it, random.Random(seed), flip=bool(seed % 2))
        assert tuple(px.shape[1:]) == (it.bucket[1], it.bucket[0]) == size.target_hw


def test_images_without_face_info_and_color_aug_off_are_loaded_as_before(tmp_path):
    folder = face_images(tmp_path / "d")
    plain_on = items_of(folder, face_crop_aug_range=(2.0, 4.0))["plain"]
    plain_off = items_of(folder)["plain"]
    rng_on, rng_off = random.Random(4), random.Random(4)
    a, size_a = load_pixels(plain_on, rng_on)
    b, size_b = load_pixels(plain_off, rng_off)
    assert torch.equal(a, b) and size_a == size_b
    assert rng_on.getstate() == rng_off.getstate()  # nothing drawn for it: the run's other draws stay put
    face_off = items_of(folder)["face"]
    c, _ = load_pixels(face_off, random.Random(4))
    assert torch.equal(c, b)  # face crop off: a face-named file is an ordinary image


def test_config_and_dataset_toml_take_both_and_name_the_fields(tmp_path):
    base = dict(token_string="tok", train_data_dir=str(tmp_path))
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**base, "color_aug": True, "face_crop_aug_range": "2,4"})
    assert set(e.value.errors) == {"color_aug", "face_crop_aug_range"}
    assert all("cache_latents" in m for m in e.value.errors.values())
    for bad in ("4,2", "0,3", "x", "1,2,3", [1, "a"]):
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict({**base, "cache_latents": False, "face_crop_aug_range": bad})
        assert list(e.value.errors) == ["face_crop_aug_range"], bad
    cfg = TrainConfig.from_dict({**base, "cache_latents": False, "color_aug": True, "face_crop_aug_range": [2, 4]})
    assert cfg.subset_options()["face_crop_aug_range"] == (2.0, 4.0) and cfg.subset_options()["color_aug"]
    from lib_ti.train_cli import build_config

    args = tmp_path / "args.toml"  # kohya's config file writes the CLI's text
    args.write_text(f'token_string = "tok"\ntrain_data_dir = "{tmp_path}"\ncache_latents = false\n'
                    'color_aug = true\nface_crop_aug_range = "2.0,4.0"\n')
    for c in (build_config(str(args), None, None),
              build_config(None, None, ["token_string=tok", f"train_data_dir={tmp_path}", "cache_latents=false",
                                        "color_aug=true", "face_crop_aug_range=2.0,4.0"])):
        assert c.subset_options()["face_crop_aug_range"] == (2.0, 4.0) and c.color_aug

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    toml = tmp_path / "d.toml"
    toml.write_text('[general]\ncolor_aug = true\nface_crop_aug_range = [2.0, 4.0]\n[[datasets]]\n'
                    f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\n'
                    f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "b"}"\ncolor_aug = false\n'
                    'face_crop_aug_range = [1.5, 1.5]\n')
    a, b = load_dataset_toml(toml, defaults=cfg.subset_options()).subsets
    assert (a.color_aug, a.face_crop_aug_range) == (True, (2.0, 4.0))
    assert (b.color_aug, b.face_crop_aug_range) == (False, (1.5, 1.5))
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\n'
                    'face_crop_aug_range = [0, 2]\n')
    with pytest.raises(DataError, match="face_crop_aug_range"):
        load_dataset_toml(toml)


@pytest.mark.parametrize("opt", [{"color_aug": True}, {"face_crop_aug_range": (2.0, 4.0)}])
def test_latent_cache_refuses_a_subset_that_augments(tmp_path, opt):
    items = list(items_of(face_images(tmp_path / "d"), **opt).values())
    with pytest.raises(DataError) as e:
        LatentCache(items, lambda px: px)
    assert next(iter(opt)) in str(e.value) and "cache_latents" in str(e.value)


@pytest.mark.slow
def test_tiny_run_with_both_on_is_reproducible_and_resumes_exactly(tiny_sd1, tmp_path):
    from lib_ti import formats, run
    from lib_ti.train import Callbacks

    data = face_images(tmp_path / "data")
    for p in data.glob("*.png"):
        p.with_suffix(".txt").write_text("a photo of mytok, red square")

    def go(steps, name, **kw):
        cfg = TrainConfig.from_dict(dict(
            token_string="mytok", init_word="ball", train_data_dir=str(data), resolution="64",
            max_train_steps=steps, learning_rate="0.05", train_batch_size=1, seed=3, validation_every_n_steps=0,
            cache_latents=False, color_aug=True, face_crop_aug_range="2,4", flip_aug=True, output_name=name,
            output_dir=str(tmp_path / "out"), **kw))
        notes = []
        res = run.run(cfg, tiny_sd1, run.FolderOutputs(str(tmp_path / "out")), Callbacks(log=notes.append))
        assert res.status == "done", res.error
        return formats.read_embedding(res.output).vectors, notes

    straight, _ = go(4, "a", save_every_n_steps=2)
    again, _ = go(4, "b")
    assert all(torch.equal(straight[k], again[k]) for k in straight)  # same seed, same augmentations
    resumed, notes = go(4, "c", weights=str(tmp_path / "out" / "a-2.safetensors"))
    assert any("resuming exactly from step 2" in n for n in notes), notes
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6, rtol=0) for k in straight)


def test_validation_batch_keeps_the_images_own_colours(tiny_sd1, tmp_path):
    """The fixed validation batch is the one loss curve that is not noise: colour changes there would
    make it measure the augmentation instead of the embedding. Crops stay (a face crop is the view)."""
    from lib_ti.data import PromptBuilder
    from lib_ti.prepare import validation_batch

    folder = tmp_path / "d"
    folder.mkdir()
    colourful(seed=0, n=64).save(folder / "c.png")
    plain, = items_of(folder).values()
    aug, = items_of(folder, color_aug=True).values()
    seeds = range(6)
    # under at least one of these seeds, color_aug would change the validation image
    assert any(not torch.equal(load_pixels(aug, random.Random(s))[0], load_pixels(plain, random.Random(s))[0])
               for s in seeds)
    for s in seeds:
        latents = []
        for colour, it in ((False, plain), (True, aug)):
            cfg = TrainConfig.from_dict(dict(token_string="mytok", init_word="ball", train_data_dir=str(folder),
                                             cache_latents=False, color_aug=colour, validation_seed=s,
                                             validation_batch_size=1))
            torch.manual_seed(0)  # the VAE samples from the global RNG; run.run seeds it the same way
            latents.append(validation_batch(cfg, tiny_sd1, [it], [it], None, PromptBuilder("mytok", "object")).latents)
        assert torch.equal(latents[0][0], latents[1][0]), s


@pytest.mark.parametrize("line", ["color_aug = true", "face_crop_aug_range = [2.0, 4.0]", "random_crop = true"])
def test_submit_checks_name_a_dataset_toml_that_augments_with_the_cache_on(tiny_sd1, tmp_path, line):
    """Known before the run: found by preflight (what the tab and the API run at submit), not after
    the run was queued and started caching."""
    from lib_ti import preflight

    face_images(tmp_path / "d")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "d"}"\n{line}\n')
    base = dict(token_string="mytok", init_word="ball", dataset_config=str(toml), resolution="64")
    errors = preflight.run_problems(TrainConfig.from_dict({**base, "cache_latents": True}), tiny_sd1)
    assert list(errors) == ["dataset_config"] and line.split(" ")[0] in errors["dataset_config"], errors
    assert preflight.run_problems(TrainConfig.from_dict({**base, "cache_latents": False}), tiny_sd1) == {}
