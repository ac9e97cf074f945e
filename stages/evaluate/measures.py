"""Image measures for the paper-effect experiments on the demo data (pure numpy).

- Crop conditioning (Sec. 2.2, Fig. 4/5): an object cut by the frame or pushed off-centre is the failure that
  ``c_crop = (0, 0)`` avoids. On demo-style images (one object of a known colour, see stages/data/demo_data.py) the
  object is segmented by colour distance, then :func:`centroid_offset` and :func:`cutoff_fraction` measure it.
- Size conditioning (Sec. 2.2, Fig. 3): conditioning on a small ``c_size`` gives blurry, detail-poor images;
  :func:`high_frequency_energy` (spectral share above a radius) and :func:`laplacian_variance` measure sharpness.

Images are H×W×3 arrays (uint8 or floats in [0, 1]; a [3, H, W] array is transposed). Measures of an image in which
the object is not found return None rather than a number that would look like a measurement.
"""

from __future__ import annotations

import math

import numpy as np

# Segmenting by colour: half the demo data's guaranteed distance between object and background colours (80).
DEFAULT_TOLERANCE = 40.0
_STAR_INNER = 0.45  # inner/outer radius of the demo data's star (demo_data.shape_points)


def as_hwc(image) -> np.ndarray:
    """H×W×3 float array on the 0–255 scale, from uint8 or [0, 1] floats, HWC or CHW."""
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"image must be a 3-D array (H, W, 3) or (3, H, W), got shape {array.shape}")
    if array.shape[-1] != 3 and array.shape[0] == 3:
        array = np.transpose(array, (1, 2, 0))
    if array.shape[-1] != 3:
        raise ValueError(f"image must have 3 colour channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    array = array.astype(np.float64)
    return array * 255.0 if array.max(initial=0.0) <= 1.0 else array


def object_mask(image, color_rgb, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Boolean H×W mask of the pixels within ``tolerance`` (Euclidean RGB distance) of ``color_rgb``."""
    pixels = as_hwc(image)
    color = np.asarray(color_rgb, dtype=np.float64)
    if color.shape != (3,):
        raise ValueError(f"color_rgb must be three numbers, got {color_rgb!r}")
    return np.linalg.norm(pixels - color, axis=-1) < tolerance


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of the mask's centre of mass as fractions of width and height (pixel centres); None if empty."""
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    h, w = mask.shape
    return float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h)


def centroid_offset(mask: np.ndarray) -> float | None:
    """Distance of the object's centroid from the image centre in [0, 1] (1 = a corner); None if no object."""
    c = centroid(mask)
    if c is None:
        return None
    return math.hypot(c[0] - 0.5, c[1] - 0.5) / math.hypot(0.5, 0.5)


def touches_border(mask: np.ndarray) -> bool:
    mask = np.asarray(mask, dtype=bool)
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def shape_area(shape: str, radius: float) -> float:
    """Area in pixels of a demo-data shape drawn in a box of half-side ``radius`` (demo_data.render)."""
    areas = {
        "circle": math.pi,
        "square": 4.0,
        "triangle": 2.0,
        "diamond": 2.0,
        "hexagon": 1.5 * math.sqrt(3.0),
        "star": 5.0 * _STAR_INNER * math.sin(math.pi / 5),
    }
    if shape not in areas:
        raise ValueError(f"shape must be one of {sorted(areas)}, got {shape!r}")
    return areas[shape] * radius * radius


def expected_object_area(params: dict, height: int, width: int) -> float:
    """Pixel area the object of demo parameters ``params`` (shape, size) has when whole in an H×W image."""
    radius = float(params["size"]) * min(height, width) / 2.0
    return shape_area(str(params["shape"]), radius)


def cutoff_fraction(mask: np.ndarray, expected_area: float) -> float | None:
    """Share of the object missing because the frame cuts it: ``1 − visible/expected`` when the mask touches the
    border (clipped to [0, 1]), 0 when the object lies inside the frame, None when there is no object."""
    if expected_area <= 0:
        raise ValueError(f"expected_area must be > 0, got {expected_area}")
    mask = np.asarray(mask, dtype=bool)
    visible = float(mask.sum())
    if visible == 0:
        return None
    if not touches_border(mask):
        return 0.0
    return float(min(max(1.0 - visible / expected_area, 0.0), 1.0))


def _gray(image) -> np.ndarray:
    pixels = as_hwc(image) / 255.0
    return pixels @ np.array([0.299, 0.587, 0.114])


def high_frequency_energy(image, radius: float = 0.25) -> float:
    """Share of the (mean-removed) grayscale power spectrum at spatial frequencies above ``radius`` × Nyquist·√2 —
    i.e. radius in [0, 1] of the normalised frequency disc; 0 for a flat image."""
    if not 0 < radius < 1:
        raise ValueError(f"radius must be in (0, 1), got {radius}")
    gray = _gray(image)
    power = np.abs(np.fft.fft2(gray - gray.mean())) ** 2
    fy = np.fft.fftfreq(gray.shape[0])[:, None]
    fx = np.fft.fftfreq(gray.shape[1])[None, :]
    norm_radius = np.sqrt(fx ** 2 + fy ** 2) / math.hypot(0.5, 0.5)
    total = float(power.sum())
    if total <= 1e-12:
        return 0.0
    return float(power[norm_radius > radius].sum() / total)


def laplacian_variance(image) -> float:
    """Variance of the 4-neighbour Laplacian of the grayscale image in [0, 1] (a classic sharpness measure)."""
    gray = _gray(image)
    if min(gray.shape) < 3:
        raise ValueError(f"image must be at least 3×3 pixels, got {gray.shape}")
    lap = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4 * gray[1:-1, 1:-1])
    return float(lap.var())


def object_measures(image, params: dict, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Every measure of one image given the demo parameters it was prompted with (``color_rgb``, ``shape``,
    ``size``): centroid offset, cut-off fraction, object found, high-frequency energy, Laplacian variance."""
    pixels = as_hwc(image)
    mask = object_mask(pixels, params["color_rgb"], tolerance)
    h, w = mask.shape
    return {
        "object_found": bool(mask.any()),
        "centroid_offset": centroid_offset(mask),
        "cutoff_fraction": cutoff_fraction(mask, expected_object_area(params, h, w)),
        "high_frequency_energy": high_frequency_energy(pixels),
        "laplacian_variance": laplacian_variance(pixels),
    }
