"""The App. I bucket table, the rule for lower resolutions, and nearest-aspect assignment."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl.buckets import (MAX_ASPECT, MIN_ASPECT, SDXL_BUCKETS_1024, bucket_name, bucket_table, in_aspect_range,
                          nearest_bucket, parse_bucket_name)


def test_app_i_table_shape():
    assert len(SDXL_BUCKETS_1024) == 40 and len(set(SDXL_BUCKETS_1024)) == 40
    for h, w in SDXL_BUCKETS_1024:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.9 * 1024**2 <= h * w <= 1.0 * 1024**2 + 1
        assert MIN_ASPECT <= h / w <= MAX_ASPECT
    aspects = [h / w for h, w in SDXL_BUCKETS_1024]
    assert aspects == sorted(aspects)  # App. I lists them by increasing height / width
    assert aspects[0] == MIN_ASPECT and aspects[-1] == MAX_ASPECT
    assert (1024, 1024) in SDXL_BUCKETS_1024
    # App. I is symmetric except that 704x1344 (0.52) has no 1344x704 twin: 20 landscape, 1 square, 19 portrait.
    missing_twins = {(h, w) for h, w in SDXL_BUCKETS_1024 if (w, h) not in SDXL_BUCKETS_1024}
    assert missing_twins == {(704, 1344)}
    assert sum(a < 1 for a in aspects) == 20 and sum(a > 1 for a in aspects) == 19


@pytest.mark.parametrize("resolution, multiple", [(1024, 64), (512, 64), (256, 64), (512, 8), (256, 8), (128, 8)])
def test_scaled_tables_keep_the_multiple_and_the_pixel_budget(resolution, multiple):
    table = bucket_table(resolution, multiple)
    assert len(set(table)) == len(table) >= 3
    scale = resolution / 1024
    for h, w in table:
        assert h % multiple == 0 and w % multiple == 0 and h >= multiple and w >= multiple
    # Each side is the App. I side scaled and rounded to the multiple, so the area is within rounding of scale².
    for (h, w) in table:
        assert any(abs(h - H * scale) <= multiple / 2 and abs(w - W * scale) <= multiple / 2
                   for H, W in SDXL_BUCKETS_1024)
    assert (resolution, resolution) in table


def test_bucket_table_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resolution and multiple must be positive"):
        bucket_table(0, 64)


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 100_000), w=st.integers(1, 100_000))
def test_nearest_bucket_is_nearest_in_log_aspect(h, w):
    bucket = nearest_bucket(h, w)
    assert bucket in SDXL_BUCKETS_1024
    distance = abs(math.log(bucket[0] / bucket[1]) - math.log(h / w))
    assert all(distance <= abs(math.log(bh / bw) - math.log(h / w)) + 1e-12 for bh, bw in SDXL_BUCKETS_1024)
    # Anything past the table's range lands in the edge bucket.
    if h / w >= MAX_ASPECT:
        assert bucket == (2048, 512)
    if h / w <= MIN_ASPECT:
        assert bucket == (512, 2048)


@settings(max_examples=100, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), resolution=st.sampled_from([256, 512]))
def test_nearest_bucket_in_scaled_tables(h, w, resolution):
    table = bucket_table(resolution, 64)
    bucket = nearest_bucket(h, w, table)
    assert bucket in table
    distance = abs(math.log(bucket[0] / bucket[1]) - math.log(h / w))
    assert all(distance <= abs(math.log(bh / bw) - math.log(h / w)) + 1e-12 for bh, bw in table)


def test_known_assignments_and_ties():
    assert nearest_bucket(1000, 1000) == (1024, 1024)
    assert nearest_bucket(1080, 1920) == (768, 1344)
    assert nearest_bucket(1, 10**6) == (512, 2048)
    assert nearest_bucket(10**6, 1) == (2048, 512)


def test_names_roundtrip_and_aspect_range():
    for bucket in SDXL_BUCKETS_1024:
        assert parse_bucket_name(bucket_name(bucket)) == bucket
    with pytest.raises(ValueError, match="not a bucket name"):
        parse_bucket_name("1024-1024")
    assert in_aspect_range(100, 400) and not in_aspect_range(100, 401)
    with pytest.raises(ValueError, match="image size must be positive"):
        nearest_bucket(0, 10)
