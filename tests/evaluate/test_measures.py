"""Measures on synthetic images with known answers: object position, cut-off share, sharpness."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.evaluate import measures

RED = (220, 30, 30)
BLUE_BG = (25, 35, 120)


def _disc(h: int, w: int, cx: float, cy: float, r: float, color=RED, background=BLUE_BG) -> np.ndarray:
    """H×W×3 uint8 image of a disc of radius r (pixels) centred at (cx·w, cy·h)."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    image = np.empty((h, w, 3), np.uint8)
    image[:] = background
    image[(xs - cx * w) ** 2 + (ys - cy * h) ** 2 <= r * r] = color
    return image


def test_centroid_offset_of_centred_and_cornered_objects():
    centred = measures.object_mask(_disc(64, 64, 0.5, 0.5, 10), RED)
    assert measures.centroid_offset(centred) == pytest.approx(0.0, abs=0.01)
    cornered = measures.object_mask(_disc(64, 64, 0.25, 0.25, 6), RED)
    # (0.25, 0.25) from the centre is half the way to the corner.
    assert measures.centroid_offset(cornered) == pytest.approx(0.5, abs=0.02)
    assert measures.centroid(cornered) == pytest.approx((0.25, 0.25), abs=0.01)
    assert measures.centroid_offset(np.zeros((8, 8), bool)) is None


def test_mask_ignores_the_background_and_accepts_float_chw_images():
    image = _disc(32, 48, 0.5, 0.5, 8)
    mask = measures.object_mask(image, RED)
    chw = np.transpose(image, (2, 0, 1)).astype(np.float32) / 255.0
    assert np.array_equal(measures.object_mask(chw, RED), mask)
    assert mask.sum() == pytest.approx(math.pi * 64, rel=0.1)
    assert not measures.object_mask(image, (250, 225, 20)).any()  # yellow is not in the image


def test_cutoff_fraction_of_an_object_half_outside_the_frame():
    r = 12.0
    expected = measures.shape_area("circle", r)
    inside = measures.object_mask(_disc(64, 64, 0.5, 0.5, r), RED)
    assert measures.cutoff_fraction(inside, expected) == 0.0
    half_out = measures.object_mask(_disc(64, 64, 0.0, 0.5, r), RED)  # centre on the left edge
    assert measures.touches_border(half_out)
    assert measures.cutoff_fraction(half_out, expected) == pytest.approx(0.5, abs=0.05)
    quarter_in = measures.object_mask(_disc(64, 64, 0.0, 0.0, r), RED)  # centre on the corner
    assert measures.cutoff_fraction(quarter_in, expected) == pytest.approx(0.75, abs=0.05)
    assert measures.cutoff_fraction(np.zeros((4, 4), bool), expected) is None
    with pytest.raises(ValueError, match="expected_area"):
        measures.cutoff_fraction(inside, 0.0)


def test_expected_area_matches_the_demo_renderer():
    from stages.data.demo_data import render

    for shape in ("circle", "square", "triangle", "diamond", "hexagon", "star"):
        params = {"render_scale": 1, "orig_h": 128, "orig_w": 128, "cx": 0.5, "cy": 0.5, "size": 0.5,
                  "shape": shape, "color_rgb": list(RED), "background_rgb": list(BLUE_BG),
                  "background_kind": "plain", "gradient_direction": None}
        pixels = np.asarray(render(params))
        got = measures.object_mask(pixels, RED).sum()
        assert got == pytest.approx(measures.expected_object_area(params, 128, 128), rel=0.06), shape
        result = measures.object_measures(pixels, params)
        assert result["object_found"] and result["cutoff_fraction"] == 0.0
        # The triangle's centre of mass sits a third of its half-height below its box centre.
        assert result["centroid_offset"] < (0.15 if shape == "triangle" else 0.02), shape


def test_high_frequency_energy_orders_sharp_above_smooth():
    h = w = 64
    checker = ((np.add.outer(np.arange(h), np.arange(w)) % 2) * 255).astype(np.uint8)
    checker = np.repeat(checker[..., None], 3, axis=2)
    ramp = np.repeat(np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))[..., None], 3, axis=2)
    flat = np.full((h, w, 3), 128, np.uint8)
    assert measures.high_frequency_energy(checker) > 0.99
    assert measures.high_frequency_energy(ramp) < 0.1
    assert measures.high_frequency_energy(flat) == 0.0
    sharp = _disc(h, w, 0.5, 0.5, 16)
    kernel = np.ones(5) / 5  # box blur along both axes
    blurred = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), 0, sharp.astype(float))
    blurred = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), 1, blurred)
    assert measures.high_frequency_energy(sharp) > measures.high_frequency_energy(blurred)
    assert measures.laplacian_variance(sharp) > measures.laplacian_variance(blurred)
    assert measures.laplacian_variance(flat) == 0.0
    with pytest.raises(ValueError, match="radius"):
        measures.high_frequency_energy(flat, radius=1.5)


def test_bad_images_are_named():
    with pytest.raises(ValueError, match="3 colour channels"):
        measures.object_mask(np.zeros((8, 8, 4)), RED)
    with pytest.raises(ValueError, match="3-D"):
        measures.object_mask(np.zeros((8, 8)), RED)
    with pytest.raises(ValueError, match="color_rgb"):
        measures.object_mask(np.zeros((8, 8, 3)), (1, 2))
    with pytest.raises(ValueError, match="shape must be"):
        measures.shape_area("blob", 2.0)
