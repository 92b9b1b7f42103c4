"""Latent cache: one encode per image (and mirror), bucket-pure VAE batches, disk hits, refusals."""

from __future__ import annotations

import os
import random

import pytest
import torch
from PIL import Image

from lib_ti.data import DataError, DatasetSpec, LatentCache, SubsetSpec, load_pixels, scan
from lib_ti.data.latents import CACHE_DIR


class Encoder:
    """Deterministic stand-in VAE: 8x average pooling, recording each batch."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, px: torch.Tensor) -> torch.Tensor:
        assert px.dtype == torch.float32 and px.min() >= -1 and px.max() <= 1
        self.calls.append(tuple(px.shape))
        return torch.nn.functional.avg_pool2d(px, 8)

    @property
    def images(self) -> int:
        return sum(c[0] for c in self.calls)


def dataset(tmp_path, flip=False, random_crop=False):
    rng = random.Random(0)
    for n, size in enumerate([(64, 64), (64, 64), (128, 64), (64, 128), (64, 64)]):
        Image.effect_noise(size, 40 + rng.random() * 40).convert("RGB").save(tmp_path / f"{n}.png")
    spec = DatasetSpec([SubsetSpec(str(tmp_path), flip_aug=flip, random_crop=random_crop)], resolution=(128, 128),
                       enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64)
    return scan(spec).items


def test_encodes_each_image_once_grouped_by_bucket(tmp_path):
    its = dataset(tmp_path)
    enc, seen = Encoder(), []
    cache = LatentCache.build(its, enc, vae_batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert enc.images == len(its) == len(cache) and cache.encoded == len(its)
    # 3 square images + 1 wide + 1 tall: buckets never share a batch, so 2 + 1 + 1 calls
    assert sorted(enc.calls) == [(1, 3, 64, 128), (1, 3, 128, 64), (1, 3, 128, 128), (2, 3, 128, 128)]
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    for i, it in enumerate(its):
        lat, size = cache.get(i)
        px, want = load_pixels(it, None, flip=False)
        assert torch.allclose(lat, torch.nn.functional.avg_pool2d(px[None], 8)[0], atol=1e-6)
        assert size == want and lat.dtype == torch.float32


def test_flip_aug_caches_the_mirror(tmp_path):
    its = dataset(tmp_path)
    enc = Encoder()
    cache = LatentCache.build(its, enc, vae_batch_size=4, flip_aug=True, dtype=torch.float16)
    assert enc.images == 2 * len(its)
    lat, size = cache.get(2, flip=True)
    px, want = load_pixels(its[2], None, flip=True)
    assert lat.dtype == torch.float16
    assert torch.allclose(lat.float(), torch.nn.functional.avg_pool2d(px[None], 8)[0], atol=1e-2)
    assert size == want


def test_disk_cache_hit_skips_the_encoder(tmp_path):
    its = dataset(tmp_path, flip=True)
    first = Encoder()
    a = LatentCache.build(its, first, vae_batch_size=3, to_disk=True, cache_key="vae-A")
    assert first.images == 2 * len(its)
    assert len(list((tmp_path / CACHE_DIR).glob("*.safetensors"))) == len(its)
    second = Encoder()
    b = LatentCache.build(its, second, vae_batch_size=3, to_disk=True, cache_key="vae-A")
    assert second.calls == [] and b.loaded == 2 * len(its)
    for i in range(len(its)):
        for f in (False, True):
            assert torch.equal(a.get(i, f)[0], b.get(i, f)[0])
    other = Encoder()  # another VAE must not reuse these latents
    LatentCache.build(its, other, to_disk=True, cache_key="vae-B")
    assert other.images == 2 * len(its)


def test_changed_image_misses_the_disk_cache(tmp_path):
    its = dataset(tmp_path)
    LatentCache.build(its, Encoder(), to_disk=True)
    st = os.stat(its[0].path)
    os.utime(its[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    enc = Encoder()
    LatentCache.build(its, enc, to_disk=True)
    assert enc.images == 1


def test_corrupt_cache_file_is_only_a_miss(tmp_path):
    its = dataset(tmp_path)
    LatentCache.build(its, Encoder(), to_disk=True)
    for p in (tmp_path / CACHE_DIR).glob("*.safetensors"):
        p.write_bytes(b"junk")
    enc = Encoder()
    cache = LatentCache.build(its, enc, to_disk=True)
    assert enc.images == len(its) and cache.warnings


def test_random_crop_with_cache_is_refused(tmp_path):
    its = dataset(tmp_path, random_crop=True)
    with pytest.raises(DataError, match="random_crop"):
        LatentCache.build(its, Encoder())


def test_stop_early_then_encode_on_demand(tmp_path):
    its = dataset(tmp_path)
    enc = Encoder()
    cache = LatentCache.build(its, enc, should_stop=lambda: True)
    assert enc.calls == [] and len(cache) == 0
    lat, _ = cache.get(3)
    assert lat.shape == (3, its[3].bucket[1] // 8, its[3].bucket[0] // 8) and enc.images == 1
