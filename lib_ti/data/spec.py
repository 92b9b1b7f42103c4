"""Plain dataset descriptions (kohya names) and folder discovery.

The training config is converted into these; nothing here knows about TrainConfig.
Sizes: `DatasetSpec.resolution` is (height, width) like SizeCond; bucket and image sizes elsewhere
in this package are (width, height), kohya's order, and are named `*_wh` where it matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_KOHYA_DIR = re.compile(r"^(\d+)_(.*)$")
MAX_REPEATS = 10000  # each repeat is an entry of every epoch's list: a typo of 1e12 must not fill the memory


class DataError(ValueError):
    """The dataset cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class SubsetSpec:
    image_dir: str
    num_repeats: int = 1
    is_reg: bool = False
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    flip_aug: bool = False
    random_crop: bool = False
    class_tokens: str | None = None  # caption for images without a caption file (kohya)
    # kohya caption augmentation (captions.caption_text applies them in kohya's order)
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_prefix: str = ""
    caption_suffix: str = ""
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    # kohya image augmentation (augment.py); both need the images loaded each step (no latent cache)
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None  # (low, high): crop = low..high face sizes


@dataclass
class DatasetSpec:
    subsets: list[SubsetSpec] = field(default_factory=list)
    resolution: tuple[int, int] = (512, 512)  # (h, w)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    batch_size: int = 1
    center_crop: bool = True  # False: squash each image to its bucket (InvokeAI/diffusers without center_crop)


SUBSET_OPTIONS = tuple(f for f in SubsetSpec.__dataclass_fields__ if f != "image_dir")


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTS


def list_images(folder: str | Path) -> list[Path]:
    """Images directly in `folder` (no recursion, like A1111 and kohya), sorted for determinism."""
    return sorted((p for p in Path(folder).iterdir() if is_image(p)), key=lambda p: p.name)


def subsets_from_train_dir(train_data_dir: str | Path, **options: object) -> list[SubsetSpec]:
    """Subsets for a training (or, with is_reg=True, regularization) folder.

    * A flat folder of images (the WebUI way) is one subset with num_repeats 1.
    * kohya's DreamBooth layout: every `<repeats>_<name>` subfolder becomes a subset with
      num_repeats=<repeats> and class_tokens=<name>. Other subfolders are ignored as in kohya;
      images lying directly in the root are kept as a repeats-1 subset rather than dropped silently.
    `options` are SubsetSpec fields applied to every subset (except num_repeats/class_tokens of
    kohya folders, which come from the folder name).
    """
    root = Path(train_data_dir)
    if not str(train_data_dir) or not root.is_dir():
        raise DataError(f"image folder '{train_data_dir}' does not exist")
    unknown = set(options) - set(SUBSET_OPTIONS)
    if unknown:
        raise DataError(f"unknown subset option(s) {sorted(unknown)}; allowed: {list(SUBSET_OPTIONS)}")
    subsets = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name):
        m = _KOHYA_DIR.match(sub.name)
        if m and int(m.group(1)) > MAX_REPEATS:
            raise DataError(f"folder '{sub}': {m.group(1)} repeats is over {MAX_REPEATS}")
        if m and int(m.group(1)) >= 1:
            opts = {**options, "num_repeats": int(m.group(1)), "class_tokens": m.group(2) or None}
            subsets.append(SubsetSpec(image_dir=str(sub), **opts))  # type: ignore[arg-type]
    if not subsets or any(is_image(p) for p in root.iterdir()):
        subsets.insert(0, SubsetSpec(image_dir=str(root), **options))  # type: ignore[arg-type]
    return subsets
