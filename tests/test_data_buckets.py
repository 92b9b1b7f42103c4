"""Bucket properties (kohya semantics) checked with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_ti.data import BucketManager, DataError, DatasetSpec, assign_bucket, make_buckets

steps = st.sampled_from([8, 32, 64])


@st.composite
def bucket_params(draw):
    step = draw(steps)
    lo = draw(st.integers(64 // step + 1, 512 // step)) * step  # kohya's bounds are step multiples
    hi = draw(st.integers(lo + step, 2048))  # any max: rounded down onto the grid
    side = draw(st.integers(lo, hi))
    other = draw(st.integers(lo, hi))
    return (side, other), lo, hi, step


@settings(deadline=None, max_examples=150)
@given(bucket_params())
def test_bucket_sides_on_grid_within_bounds_and_area(params):
    reso, lo, hi, step = params
    buckets = make_buckets(reso, lo, hi, step)
    assert buckets and buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= reso[0] * reso[1]


@settings(deadline=None, max_examples=150)
@given(bucket_params(), st.integers(1, 5000), st.integers(1, 5000))
def test_assigned_aspect_error_is_minimal(params, w, h):
    reso, lo, hi, step = params
    buckets = make_buckets(reso, lo, hi, step)
    b = assign_bucket(w, h, buckets)
    assert b in buckets
    err = abs(b[0] / b[1] - w / h)
    assert all(err <= abs(c[0] / c[1] - w / h) + 1e-12 for c in buckets)


def test_kohya_512_buckets():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert (384, 640) in buckets and (640, 384) in buckets


def test_no_bucket_fits_is_a_clear_error():
    with pytest.raises(DataError, match="no bucket fits"):
        make_buckets((128, 128), 256, 1024, 64)


@settings(deadline=None, max_examples=150)
@given(st.integers(16, 3000), st.integers(16, 3000), steps)
def test_no_upscale_never_enlarges(w, h, step):
    spec = DatasetSpec(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True,
                       bucket_reso_steps=step, min_bucket_reso=64, max_bucket_reso=1024)
    bucket, resized = BucketManager(spec).assign(w, h)
    assert bucket[0] % step == 0 and bucket[1] % step == 0
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]  # the crop always fits
    if w >= step and h >= step:
        assert resized[0] <= w and resized[1] <= h  # never upscaled
        # kohya rounds the second side to the nearest step, which can overshoot by up to a step
        assert bucket[0] * bucket[1] <= 512 * 512 + max(bucket) * step
    if w * h <= 512 * 512 and w >= step and h >= step:
        assert resized == (w, h) and bucket == (w - w % step, h - h % step)


def test_fixed_resolution_without_buckets():
    spec = DatasetSpec(resolution=(512, 768), enable_bucket=False)  # (h, w)
    m = BucketManager(spec)
    for w, h in [(100, 100), (3000, 1000), (768, 512)]:
        bucket, resized = m.assign(w, h)
        assert bucket == (768, 512)
        assert resized[0] >= 768 and resized[1] >= 512
        assert min(resized[0] - 768, resized[1] - 512) == 0  # covers, one side exact


def test_max_bucket_reso_below_resolution_is_refused():
    with pytest.raises(DataError, match="max_bucket_reso"):
        BucketManager(DatasetSpec(resolution=(1024, 1024), enable_bucket=True, max_bucket_reso=768))
