"""Alg. 1 (resize to cover, random crop on the overflowing axis) as properties over image and target sizes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdxl.crops import CropInfo, bucket_crop_resize, cover_size, crop, random_crop_resize, resize

sides = st.integers(min_value=1, max_value=300)
targets = st.integers(min_value=8, max_value=96)


def _gradient_image(h: int, w: int) -> Image.Image:
    # Distinct values per position, so a wrong crop window cannot compare equal by accident.
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    array = np.stack([(ys * 7) % 256, (xs * 13) % 256, (ys + xs) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(array)


@settings(max_examples=60, deadline=None)
@given(h=sides, w=sides, th=targets, tw=targets, seed=st.integers(0, 2**31))
def test_bucket_crop_properties(h, w, th, tw, seed):
    image = _gradient_image(h, w)
    out, info = bucket_crop_resize(image, (th, tw), rng=random.Random(seed))
    assert (out.height, out.width) == (th, tw)
    assert info == CropInfo(c_size=(h, w), c_crop=info.c_crop, c_target=(th, tw))
    rh, rw = cover_size((h, w), (th, tw))
    top, left = info.c_crop
    assert 0 <= top <= rh - th and 0 <= left <= rw - tw
    # One axis fits exactly, so at most one offset can be non-zero.
    assert rh == th or rw == tw
    assert top == 0 or left == 0
    # The recorded offsets reproduce the crop from the resized image.
    resized = resize(image, (rh, rw))
    assert np.array_equal(np.asarray(crop(resized, top, left, th, tw)), np.asarray(out))


@settings(max_examples=60, deadline=None)
@given(h=sides, w=sides, size=targets, seed=st.integers(0, 2**31))
def test_square_target_matches_shorter_side_and_crops_longer(h, w, size, seed):
    out, info = random_crop_resize(_gradient_image(h, w), size, rng=np.random.default_rng(seed))
    assert (out.height, out.width) == (size, size)
    rh, rw = cover_size((h, w), (size, size))
    assert min(rh, rw) == size
    top, left = info.c_crop
    if h <= w:  # Alg. 1: landscape/square images crop horizontally, top = 0
        assert top == 0 and 0 <= left <= rw - size
    else:
        assert left == 0 and 0 <= top <= rh - size


def test_offsets_cover_every_position_uniformly():
    rng = random.Random(0)
    image = _gradient_image(16, 32)  # → resized 16x32 for a 16x16 target: 17 possible left offsets
    lefts = [bucket_crop_resize(image, (16, 16), rng)[1].c_crop[1] for _ in range(3400)]
    counts = np.bincount(lefts, minlength=17)
    assert len(counts) == 17 and counts.min() > 120 and counts.max() < 280


def test_center_mode_is_deterministic_and_centred():
    image = _gradient_image(40, 100)
    (a, info_a), (b, info_b) = (bucket_crop_resize(image, (20, 20), mode="center") for _ in range(2))
    assert info_a == info_b and np.array_equal(np.asarray(a), np.asarray(b))
    assert info_a.c_crop == (0, (50 - 20) // 2)
    assert info_a.time_ids() == (40, 100, 0, 15, 20, 20)


def test_small_images_are_upscaled_and_keep_their_original_size():
    out, info = random_crop_resize(_gradient_image(10, 20), 64, rng=random.Random(1))
    assert (out.height, out.width) == (64, 64)
    assert info.c_size == (10, 20)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_tensor_images_match_the_same_geometry(dtype):
    tensor = (torch.rand(3, 50, 30) * 255).to(dtype)
    out, info = bucket_crop_resize(tensor, (24, 24), rng=torch.Generator().manual_seed(3))
    assert out.shape == (3, 24, 24) and out.dtype == dtype
    assert info.c_size == (50, 30) and info.c_crop[1] == 0
    resized = resize(tensor, cover_size((50, 30), (24, 24)))
    assert torch.equal(crop(resized, *info.c_crop, 24, 24), out)


def test_same_seed_same_crop():
    image = _gradient_image(64, 200)
    first = bucket_crop_resize(image, (32, 32), random.Random(7))[1]
    assert first == bucket_crop_resize(image, (32, 32), random.Random(7))[1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(bucket=(0, 32)), "target sides must be positive"),
    (dict(bucket="big"), "target must be"),
    (dict(bucket=(32, 32), mode="left"), "mode must be one of"),
    (dict(bucket=(32, 32), rng="seed"), "rng must be"),
])
def test_bad_arguments_raise_named_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bucket_crop_resize(_gradient_image(40, 80), **kwargs)


def test_bad_images_raise_named_errors():
    with pytest.raises(TypeError, match="image must be"):
        random_crop_resize([[1, 2]], 8)
    with pytest.raises(ValueError, match="image tensor must be"):
        random_crop_resize(torch.zeros(8, 8), 8)
    with pytest.raises(ValueError, match="image is empty"):
        random_crop_resize(torch.zeros(3, 0, 8), 8)
    with pytest.raises(ValueError, match="exceeds the image"):
        crop(_gradient_image(8, 8), 4, 0, 8, 8)
