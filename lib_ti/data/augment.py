"""kohya sd-scripts' image augmentations `color_aug` and `face_crop_aug_range`, with kohya's draws.

Every random number comes from the caller's `random.Random` (the run's seeded RNG, which the resume
state saves), so a run repeats per seed and a resumed run continues exactly. kohya uses OpenCV;
this is the same arithmetic in numpy/PIL.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
from PIL import Image

_RS = getattr(Image, "Resampling", Image)
HUE_SHIFT_DEG = 16.0  # kohya: uniform(-8, 8) in OpenCV's 0..180 hue, i.e. +-16 degrees
_FACE = re.compile(r"_(\d+)_(\d+)_(\d+)_(\d+)$")


def shift_hue(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate every pixel's hue by `degrees`. Each pixel keeps its max and min channel, so HSV
    value and saturation are unchanged; 0 gives the image back."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mx, mn = a.max(-1), a.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    # hue in sextants 0..6 (grey pixels have none and stay grey)
    h = np.select([mx == r, mx == g], [((g - b) / safe) % 6.0, (b - r) / safe + 2.0], (r - g) / safe + 4.0)
    h = (h + degrees / 60.0) % 6.0
    x = c * (1.0 - np.abs(h % 2.0 - 1.0))
    sector = np.floor(h).astype(np.int64) % 6
    zero = np.zeros_like(c)
    rgb = [np.choose(sector, ch) for ch in ((c, x, zero, zero, x, c), (x, c, c, x, zero, zero),
                                            (zero, zero, x, c, c, x))]
    out = np.stack(rgb, -1) + mn[..., None]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def gamma(img: Image.Image, g: float) -> Image.Image:
    """kohya's "random gamma": every 0..255 value raised to `g` (0.95..1.05 there), clipped."""
    a = np.asarray(img, dtype=np.float64) ** g
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def color_aug(img: Image.Image, rng: random.Random) -> Image.Image:
    """kohya's weak colour augmentation: a third of the time, either a hue shift of up to
    +-16 degrees or a gamma of 0.95..1.05, each half of those times; otherwise unchanged."""
    if rng.random() <= 0.33:
        if rng.random() > 0.5:
            return shift_hue(img, rng.uniform(-HUE_SHIFT_DEG, HUE_SHIFT_DEG))
        return gamma(img, rng.uniform(0.95, 1.05))
    return img


def face_info(path: str) -> tuple[int, int, int, int] | None:
    """(cx, cy, w, h) of the face from a file named `<anything>_<cx>_<cy>_<w>_<h>.<ext>` (kohya's
    convention, pixels of the upright image), or None: then the image is cropped as usual."""
    m = _FACE.search(Path(path).stem)
    if not m:
        return None
    cx, cy, w, h = (int(v) for v in m.groups())
    return (cx, cy, w, h) if cx > 0 and max(w, h) > 0 else None  # kohya: face_cx > 0 means "has a face"


def face_crop(img: Image.Image, face: tuple[int, int, int, int], target: tuple[int, int],
              face_range: tuple[float, float], random_crop: bool, rng: random.Random) -> Image.Image:
    """kohya's crop_target: scale the image so the face is 1/high..1/low of the target's short
    side (drawn uniformly between), then cut `target` (w, h) around the face. The image is never
    scaled up for the face, only as far as needed to cover the target. With random_crop the
    window wanders (kohya: to show background); otherwise it jitters by up to 1/20 of the face
    when the range is a range and the face is large."""
    (w, h), (tw, th) = img.size, target
    cx, cy, fw, fh = face
    lo, hi = face_range
    face_size, size = max(fw, fh), min(tw, th)
    fit = max(tw / w, th / h)  # the scale at which the image just covers the target
    cap = max(1.0, fit)  # kohya caps at 1 (no upscaling); a smaller image is scaled up to cover only
    min_scale = min(cap, max(fit, size / (face_size * hi)))
    max_scale = min(cap, max(min_scale, size / (face_size * lo)))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    nw, nh = max(tw, int(w * scale + 0.5)), max(th, int(h * scale + 0.5))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RS.LANCZOS if scale < 1 else _RS.BICUBIC)
    fcx, fcy = int(cx * scale + 0.5), int(cy * scale + 0.5)
    start = []
    for t, length, fp in ((th, nh, fcy), (tw, nw, fcx)):  # kohya's order: height, then width
        p = fp - t // 2  # the face at the centre
        if random_crop:
            reach = max(length - fp, fp)
            p += rng.randint(0, reach) + rng.randint(0, reach) - reach  # -reach..reach, centre most likely
        elif lo != hi and face_size > size // 10 and face_size >= 40:
            p += rng.randint(-face_size // 20, face_size // 20)
        start.append(max(0, min(p, length - t)))
    top, left = start
    return img.crop((left, top, left + tw, top + th))
