"""Which of the demo generator's shapes an object mask shows, from pixels only (no learned network).

The generator draws each shape axis-aligned from one outline (stages/data/demo_data.py: ``shape_points``, a circle
for "circle"), so a shape is known up to its centre and size. The reader takes the mask's largest connected blob,
fits every shape's outline to the blob's bounding box (each outline has its own box: a hexagon is wider than tall, a
triangle's or a star's box is not centred on the shape's centre), renders it with anti-aliasing and keeps the
shape whose rendering overlaps the blob best (soft intersection over union). A blob that matches no outline well
(below ``MIN_IOU``: a smear, two blobs, a cut-off object) reads as no shape, so a model scores only for shapes it
draws.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from stages.data.demo_data import SHAPES, shape_points

SUPERSAMPLE = 4  # the outline is rendered this much finer, then box-averaged: its edge pixels are partial coverage
MIN_IOU = 0.6  # below this overlap with the best outline the blob is not read as any shape
MIN_BLOB_PX = 12  # a smaller blob is too few pixels to tell the outlines apart


@lru_cache(maxsize=None)
def outline(shape: str) -> tuple[tuple[tuple[float, float], ...], tuple[float, float, float, float]]:
    """(polygon of ``shape`` at centre (0, 0) and half-size 1 (empty for a circle), its box x0, y0, x1, y1)."""
    if shape == "circle":
        return (), (-1.0, -1.0, 1.0, 1.0)
    points = tuple(shape_points(shape, 0.0, 0.0, 1.0))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return points, (min(xs), min(ys), max(xs), max(ys))


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean H×W mask (stray pixels and smaller blobs dropped)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(sizes.argmax()) + 1)


def render_fitted(shape: str, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """``shape``'s outline fitted into the pixel box x0, y0, x1, y1 (edges, exclusive ends) of an image of ``size``
    (H, W): an H×W float coverage in [0, 1]."""
    from PIL import Image, ImageDraw

    points, (ex0, ey0, ex1, ey1) = outline(shape)
    x0, y0, x1, y1 = box
    r = ((x1 - x0) / (ex1 - ex0) + (y1 - y0) / (ey1 - ey0)) / 2  # one size for both axes: shapes are not stretched
    cx, cy = (x0 + x1) / 2 - (ex0 + ex1) / 2 * r, (y0 + y1) / 2 - (ey0 + ey1) / 2 * r
    h, w = size
    s = SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    if not points:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon([((cx + px * r) * s, (cy + py * r) * s) for px, py in points], fill=255)
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Soft IoU of the mask's largest blob with every shape's fitted outline ({} when the blob is too small)."""
    blob = largest_blob(np.asarray(mask, dtype=bool))
    if int(blob.sum()) < MIN_BLOB_PX:
        return {}
    ys, xs = np.nonzero(blob)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    target = blob.astype(np.float32)
    scores = {}
    for shape in SHAPES:
        coverage = render_fitted(shape, box, blob.shape)
        union = float(np.maximum(coverage, target).sum())
        scores[shape] = float(np.minimum(coverage, target).sum()) / union if union > 0 else 0.0
    return scores


def read_shape(mask: np.ndarray | None) -> str | None:
    """The demo shape the object mask shows best, or None (no mask, too small a blob, no outline fits)."""
    if mask is None:
        return None
    scores = shape_scores(mask)
    if not scores:
        return None
    best = max(scores, key=scores.get)
    return best if scores[best] >= MIN_IOU and not math.isnan(scores[best]) else None
