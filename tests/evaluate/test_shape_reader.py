"""The shape reader (stages/evaluate/shape_reader.py) tells the demo generator's six outlines apart from pixels and
reads nothing into a mask no outline fits."""

from __future__ import annotations

import numpy as np
import pytest

from stages.data import demo_data as dd
from stages.evaluate.prompt_following import object_mask
from stages.evaluate.shape_reader import outline, read_shape, shape_scores


def _drawn(shape: str, side: int = 64, size: float = 0.4, cx: float = 0.5, cy: float = 0.5):
    params = dd.sample_params(np.random.default_rng(0), 0, 0, max_side=512)
    params.update(shape=shape, cx=cx, cy=cy, size=size, orig_h=side, orig_w=side, render_scale=1,
                  background_kind="plain", background="beige", background_rgb=list(dd.BACKGROUND_COLORS["beige"]),
                  color="purple", color_rgb=list(dd.OBJECT_COLORS["purple"]))
    return dd.render(params)


@pytest.mark.parametrize("shape", dd.SHAPES)
@pytest.mark.parametrize("side, size, cx, cy", [(64, 0.3, 0.5, 0.5), (64, 0.55, 0.3, 0.7), (128, 0.35, 0.8, 0.2)])
def test_each_outline_reads_as_itself_at_any_place_and_size(shape, side, size, cx, cy):
    assert read_shape(object_mask(_drawn(shape, side, size, cx, cy))) == shape


def test_the_largest_blob_is_read_and_stray_pixels_do_not_move_its_box():
    mask = object_mask(_drawn("triangle"))
    mask[2, 2] = mask[60, 61] = True  # noise far from the object
    mask[50:54, 4:8] = True  # a second, smaller blob
    assert read_shape(mask) == "triangle"


def test_no_shape_is_read_where_no_outline_fits():
    assert read_shape(None) is None
    assert read_shape(np.zeros((64, 64), dtype=bool)) is None
    tiny = np.zeros((64, 64), dtype=bool)
    tiny[10:13, 10:13] = True  # 9 pixels: too few to tell outlines apart
    assert shape_scores(tiny) == {} and read_shape(tiny) is None
    ring = object_mask(_drawn("circle", size=0.5)) & ~object_mask(_drawn("circle", size=0.4))
    assert max(shape_scores(ring).values()) < 0.6 and read_shape(ring) is None  # an outline, not a filled shape
    rng = np.random.default_rng(0)
    assert read_shape(rng.random((64, 64)) < 0.3) is None  # speckle


def test_every_outline_has_a_box_that_contains_its_polygon():
    for shape in dd.SHAPES:
        points, (x0, y0, x1, y1) = outline(shape)
        assert x0 < 0 < x1 and y0 < 0 < y1
        assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in points)
