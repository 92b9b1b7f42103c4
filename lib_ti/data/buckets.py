"""Aspect-ratio buckets with kohya sd-scripts semantics (`make_bucket_resolutions`, `BucketManager`).

All sizes here are (width, height), kohya's order.
"""

from __future__ import annotations

import math

from lib_ti.data.spec import DataError, DatasetSpec


def make_buckets(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                 step: int = 64) -> list[tuple[int, int]]:
    """Bucket sizes (w, h) with w*h <= the area of `max_reso`, both sides multiples of `step`
    in [min_size, max_size]. Like kohya, every width from min to max is paired with the largest
    height that fits the area (and its transpose), plus the largest square.

    Unlike kohya, min/max are first rounded onto the step grid, so a side can never fall off it.
    """
    if step <= 0:
        raise DataError(f"bucket_reso_steps must be positive, got {step}")
    area = max_reso[0] * max_reso[1]
    lo = math.ceil(min_size / step) * step
    hi = (max_size // step) * step
    resos = set()
    side = min(hi, int(math.sqrt(area)) // step * step)
    if side >= lo:
        resos.add((side, side))
    w = lo
    while w <= hi:
        h = min(hi, (area // w) // step * step)
        if h >= lo:
            resos.add((w, h))
            resos.add((h, w))
        w += step
    if not resos:
        raise DataError(f"no bucket fits: the area of resolution {max_reso[0]}x{max_reso[1]} is below "
                        f"min_bucket_reso {min_size} squared, or no multiple of bucket_reso_steps {step} "
                        f"lies between min_bucket_reso and max_bucket_reso {max_size}")
    return sorted(resos)


def assign_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to w/h (kohya: an exact size match wins, then the
    first bucket with the smallest error in sorted order)."""
    if (w, h) in buckets:
        return (w, h)
    ar = w / h
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ar))


def cover_size(w: int, h: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Size to resize (w, h) to so that it covers `bucket` with the aspect ratio kept (kohya's
    rounding), never smaller than the bucket so the crop always fits."""
    bw, bh = bucket
    scale = bh / h if w / h > bw / bh else bw / w
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


class BucketManager:
    """Chooses (bucket, resized size) for each image of a dataset.

    * enable_bucket False: every image is resized to cover `resolution` and cropped to it.
    * enable_bucket: the predefined buckets of `make_buckets`, closest aspect ratio.
    * enable_bucket + bucket_no_upscale: images no larger than the target area keep their own size
      and the bucket is that size rounded down to the step (a crop of at most step-1 pixels);
      larger ones are shrunk to the area first (kohya). A side smaller than one step is the
      only case we enlarge, to one step, since a zero-sized bucket cannot be trained.
    """

    def __init__(self, spec: DatasetSpec):
        h, w = spec.resolution
        self.enable = spec.enable_bucket
        self.no_upscale = spec.enable_bucket and spec.bucket_no_upscale
        self.step = spec.bucket_reso_steps
        self.max_area = w * h
        self.squash = not spec.center_crop
        if not self.enable:
            self.buckets = [(w, h)]
        else:
            if max(w, h) > spec.max_bucket_reso:
                raise DataError(f"max_bucket_reso {spec.max_bucket_reso} must be at least the resolution "
                                f"sides {w}x{h} (kohya rule)")
            self.buckets = make_buckets((w, h), spec.min_bucket_reso, spec.max_bucket_reso, self.step)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def assign(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bucket (w, h), resized (w, h)) for an image of size (w, h). Squashing resizes the whole
        image to the bucket, aspect ratio ignored, so nothing is cropped."""
        bucket, resized = self._assign(w, h)
        return (bucket, bucket) if self.squash else (bucket, resized)

    def _assign(self, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        if not self.no_upscale:
            bucket = assign_bucket(w, h, self.buckets)
            return bucket, cover_size(w, h, bucket)
        ar = w / h
        if w * h > self.max_area:
            # shrink to the area, then round the side whose rounding keeps the aspect closest (kohya)
            rw = math.sqrt(self.max_area * ar)
            rh = self.max_area / rw
            bw_w = max(self.step, self._round(rw))
            bh_w = max(self.step, self._round(bw_w / ar))
            bh_h = max(self.step, self._round(rh))
            bw_h = max(self.step, self._round(bh_h * ar))
            if abs(bw_w / bh_w - ar) < abs(bw_h / bh_h - ar):
                resized = (bw_w, int(bw_w / ar + 0.5))
            else:
                resized = (int(bh_h * ar + 0.5), bh_h)
        else:
            resized = (w, h)
        bucket = (max(self.step, resized[0] - resized[0] % self.step),
                  max(self.step, resized[1] - resized[1] % self.step))
        if resized[0] < bucket[0] or resized[1] < bucket[1]:
            resized = cover_size(w, h, bucket)
        return bucket, resized
