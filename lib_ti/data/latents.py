"""Latent cache: every image goes through the VAE once (twice with flip_aug), not every step.

On disk, latents live in `.ti_latents/` beside each image, one `.safetensors` file per image
named by a key of (VAE cache_key, bucket, resize, dtype, file mtime and size), so any change to
the image, the crop or the VAE misses the cache instead of silently reusing a stale latent.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from lib_ti.data.images import ImageItem, crop_box, load_pixels, size_cond
from lib_ti.data.spec import DataError
from lib_ti.model import SizeCond

CACHE_DIR = ".ti_latents"
_NAMES = {False: "latent", True: "latent_flipped"}
EncodeFn = Callable[[torch.Tensor], torch.Tensor]


def disk_path(item: ImageItem, cache_key: str, dtype: torch.dtype) -> Path:
    p = Path(item.path)
    st = p.stat()
    raw = f"{cache_key}|{item.bucket}|{item.resized}|{dtype}|{st.st_mtime_ns}|{st.st_size}"
    return p.parent / CACHE_DIR / f"{p.name}.{hashlib.sha1(raw.encode()).hexdigest()[:16]}.safetensors"


class LatentCache:
    """Latents of `items` on the CPU, looked up by item index and flip."""

    def __init__(self, items: list[ImageItem], encode_fn: EncodeFn, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, to_disk: bool = False, cache_key: str = ""):
        refuse_random_crop(items)
        self.items, self.encode_fn, self.device, self.dtype = items, encode_fn, device, dtype
        self.to_disk, self.cache_key = to_disk, cache_key
        self.store: dict[tuple[int, bool], torch.Tensor] = {}
        self.encoded = 0  # images sent through encode_fn (hits from disk do not count)
        self.loaded = 0  # latents read from disk
        self.warnings: list[str] = []

    @classmethod
    def build(cls, items: list[ImageItem], encode_fn: EncodeFn, vae_batch_size: int = 1,
              flip_aug: bool = False, device: torch.device | str | None = None, to_disk: bool = False,
              cache_key: str = "", dtype: torch.dtype = torch.float32,
              progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> LatentCache:
        """Encode (or read from disk) every item, and its mirror image when flip_aug or its subset's
        flip_aug is on. Batches of `vae_batch_size` never mix buckets. If `should_stop` turns true
        the build ends early; anything missing is then encoded on first `get`."""
        cache = cls(items, encode_fn, device, dtype, to_disk, cache_key)
        wanted = [(i, f) for i, it in enumerate(items)
                  for f in ((False, True) if flip_aug or it.subset.flip_aug else (False,))]
        total = len(wanted)
        if to_disk:
            for i in sorted({i for i, _ in wanted}):
                cache._load(i)
        missing = [k for k in wanted if k not in cache.store]
        done = total - len(missing)
        if progress:
            progress(done, total)
        by_bucket: dict[tuple[int, int], list[tuple[int, bool]]] = defaultdict(list)
        for k in missing:
            by_bucket[items[k[0]].bucket].append(k)
        for bucket in sorted(by_bucket):
            keys = by_bucket[bucket]
            for s in range(0, len(keys), max(1, vae_batch_size)):
                if should_stop and should_stop():
                    return cache
                chunk = keys[s:s + max(1, vae_batch_size)]
                cache._encode(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        return cache

    def __len__(self) -> int:
        return len(self.store)

    def get(self, index: int, flip: bool = False) -> tuple[torch.Tensor, SizeCond]:
        """([C, h, w] latent in the cache dtype, its SDXL size condition)."""
        key = (index, bool(flip))
        if key not in self.store:
            self._encode([key])
        item = self.items[index]
        top, left = crop_box(item, None)
        return self.store[key], size_cond(item, top, left, bool(flip))

    def _encode(self, keys: list[tuple[int, bool]]) -> None:
        pixels = torch.stack([load_pixels(self.items[i], None, flip=f)[0] for i, f in keys])
        if self.device is not None:
            pixels = pixels.to(self.device)
        with torch.no_grad():
            out = self.encode_fn(pixels)
        if out.shape[0] != len(keys):
            raise RuntimeError(f"encode_fn returned {out.shape[0]} latents for {len(keys)} images")
        self.encoded += len(keys)
        for k, lat in zip(keys, out):
            # clone: a slice of the batch would keep the whole batch alive and share storage
            self.store[k] = lat.detach().to("cpu", self.dtype).clone()
        if self.to_disk:
            for i in sorted({i for i, _ in keys}):
                self._save(i)

    def _load(self, index: int) -> None:
        from safetensors.torch import load_file

        try:
            path = disk_path(self.items[index], self.cache_key, self.dtype)
            if not path.is_file():
                return
            data = load_file(str(path))
        except Exception as e:  # a damaged cache file is only a miss
            self.warnings.append(f"ignored latent cache for {self.items[index].path}: {e}")
            return
        for flip, name in _NAMES.items():
            if name in data:
                self.store[(index, flip)] = data[name].to(self.dtype)
                self.loaded += 1

    def _save(self, index: int) -> None:
        from safetensors.torch import save_file

        tensors = {name: self.store[(index, f)].contiguous()
                   for f, name in _NAMES.items() if (index, f) in self.store}
        try:
            path = disk_path(self.items[index], self.cache_key, self.dtype)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, str(tmp), metadata={"image": Path(self.items[index].path).name,
                                                   "cache_key": self.cache_key})
            os.replace(tmp, path)  # atomic: an interrupted write never leaves a half file behind
        except OSError as e:  # read-only dataset folder: keep going with the RAM cache
            self.warnings.append(f"cannot write latent cache beside {self.items[index].path}: {e}")


def refuse_random_crop(items: list[ImageItem]) -> None:
    """kohya's rule: a cached latent is one fixed view of the image, so the options that change the
    view each step (random_crop, color_aug, face_crop_aug_range) need cache_latents off."""
    for opt in ("random_crop", "color_aug", "face_crop_aug_range"):
        dirs = sorted({it.subset.image_dir for it in items if getattr(it.subset, opt)})
        if dirs:
            raise DataError(f"{opt} cannot be combined with cache_latents: a cached latent is one fixed view "
                            f"of the image and cannot be re-cropped or re-coloured each step (kohya rule). Turn "
                            f"off {opt} or cache_latents ({opt} is on for: {', '.join(dirs)})")
