"""Finding, checking and loading training images.

Every image is opened and decoded once while scanning, so a corrupt file is reported by name up
front instead of failing mid-training; it is skipped, never fatal, unless nothing is left.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lib_ti.config_compat import check_caption_extension
from lib_ti.data import augment
from lib_ti.data.buckets import BucketManager
from lib_ti.data.spec import DataError, DatasetSpec, SubsetSpec, list_images
from lib_ti.model import SizeCond

_RS = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 moved the filters
_FLIP = getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class ImageItem:
    path: str
    size: tuple[int, int]  # (w, h) after EXIF orientation
    caption: str  # raw caption: caption file, else class_tokens, else ""
    subset: SubsetSpec
    bucket: tuple[int, int]  # (w, h) the image is cropped to
    resized: tuple[int, int]  # (w, h) it is resized to before cropping (covers `bucket`)


@dataclass
class ScanResult:
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def caption_path(image: Path, extension: str) -> Path:
    why = check_caption_extension(extension)
    if why:  # config and dataset TOML refuse it first; this keeps any other caller inside the folder
        raise DataError(f"caption_extension {why}")
    ext = extension if extension.startswith(".") else "." + extension
    return image.with_name(image.stem + ext)


def read_caption(image: Path, subset: SubsetSpec) -> str:
    """kohya: the first line of `<stem><caption_extension>`, stripped (we skip leading blank
    lines), or with enable_wildcard every non-empty line (one is picked per step); without a
    file, the subset's class_tokens; else ""."""
    p = caption_path(image, subset.caption_extension)
    if p.is_file():
        # utf-8-sig: Windows editors often write a BOM that would otherwise glue onto the first tag
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
        return "\n".join(lines) if subset.enable_wildcard else (lines[0] if lines else "")
    return subset.class_tokens or ""


def probe(path: Path) -> tuple[int, int]:
    """Fully decode the image (so truncated files fail here) and return its upright (w, h)."""
    with Image.open(path) as im:
        im.load()
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # a broken EXIF block must not reject a decodable image
            orientation = None
    return (h, w) if orientation in _SWAPS_SIDES else (w, h)


def scan(spec: DatasetSpec) -> ScanResult:
    """Open every image of every subset, read captions and assign buckets."""
    buckets = BucketManager(spec)
    result = ScanResult()
    if not spec.subsets:
        raise DataError("the dataset has no subsets (no image folder given)")
    for subset in spec.subsets:
        if not Path(subset.image_dir).is_dir():
            raise DataError(f"image folder '{subset.image_dir}' does not exist")
        for path in list_images(subset.image_dir):
            try:
                w, h = probe(path)
            except Exception as e:  # PIL raises many types for bad files; all mean "skip it"
                result.skipped.append((str(path), f"cannot read image: {type(e).__name__}: {e}"))
                continue
            try:
                caption = read_caption(path, subset)
            except (OSError, UnicodeDecodeError) as e:
                result.skipped.append((str(path), f"cannot read caption file: {e}"))
                continue
            bucket, resized = buckets.assign(w, h)
            result.items.append(ImageItem(str(path), (w, h), caption, subset, bucket, resized))
    if not result.items:
        dirs = ", ".join(s.image_dir for s in spec.subsets)
        why = "".join(f"\n  {p}: {r}" for p, r in result.skipped)
        raise DataError(f"no usable images in {dirs} (extensions: png, jpg, jpeg, webp, bmp)"
                        + (f"; skipped:{why}" if why else ""))
    return result


def crop_box(item: ImageItem, rng: random.Random | None) -> tuple[int, int]:
    """(top, left) of the bucket-sized window in the resized image: centered (kohya rounds
    down), or uniformly random when the subset asks for random_crop."""
    (rw, rh), (bw, bh) = item.resized, item.bucket
    if item.subset.random_crop:
        r = rng or random.Random()
        return r.randint(0, rh - bh), r.randint(0, rw - bw)
    return (rh - bh) // 2, (rw - bw) // 2


def size_cond(item: ImageItem, top: int, left: int, flip: bool) -> SizeCond:
    """SDXL micro-conditioning. crop_top_left is the crop offset in the resized image; a flipped
    sample was cut from the mirrored image, where that same window starts at rw - left - bw."""
    (w, h), (rw, _), (bw, bh) = item.size, item.resized, item.bucket
    if flip:
        left = rw - left - bw
    return SizeCond(original_hw=(h, w), crop_top_left=(top, left), target_hw=(bh, bw))


def open_rgb(path: str) -> Image.Image:
    """Upright RGB. Transparent pixels are flattened onto white: a plain convert('RGB') keeps
    whatever colour hides under alpha 0 (often black or noise), which the model would learn."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im).convert("RGB")
        return im.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def load_pixels(item: ImageItem, rng: random.Random | None = None, flip: bool = False,
                colour: bool = True) -> tuple[torch.Tensor, SizeCond]:
    """The training view of `item`: [3, bh, bw] float32 in [-1, 1] and its SDXL size condition.
    kohya's order: crop (around the face for a face-named image when face_crop_aug_range is set),
    then color_aug (unless `colour` is off: the validation batch keeps the images' own colours),
    then the flip."""
    img = open_rgb(item.path)
    rng = rng or random.Random()
    face = augment.face_info(item.path) if item.subset.face_crop_aug_range else None
    bw, bh = item.bucket
    if face:
        img = augment.face_crop(img, face, item.bucket, item.subset.face_crop_aug_range, item.subset.random_crop, rng)
        size = SizeCond(original_hw=(bh, bw), crop_top_left=(0, 0), target_hw=(bh, bw))  # as kohya: the crop
    else:
        rw, rh = item.resized
        if img.size != (rw, rh):
            # LANCZOS keeps detail when shrinking; it rings when enlarging, where BICUBIC is smoother
            shrink = rw * rh < img.size[0] * img.size[1]
            img = img.resize((rw, rh), _RS.LANCZOS if shrink else _RS.BICUBIC)
        top, left = crop_box(item, rng)
        img = img.crop((left, top, left + bw, top + bh))
        size = size_cond(item, top, left, flip)
    if colour and item.subset.color_aug:
        img = augment.color_aug(img, rng)
    if flip:
        img = img.transpose(_FLIP)
    return to_tensor(img), size
