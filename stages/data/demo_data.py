"""A synthetic, captioned, controllable image dataset for demos, tests and evaluation.

Each image is one simple object (circle, square, …) of a named colour on a plain or gradient background; its caption
names colour, shape, position and background ("a red circle in the top left on a blue background"), and a same-stem
JSON file holds every generator parameter, so a later evaluation can check a generated image against its prompt.

Segmentation by colour: the object colours (``OBJECT_COLORS``) and the background palette (``BACKGROUND_COLORS``) are
disjoint, and every object colour stays at least ``MIN_COLOR_DISTANCE`` (RGB Euclidean) away from every colour a
background can take (its base colour and each shade of its gradient). So ``segment_object`` — the pixels within
``tolerance`` of the object's RGB — finds the object, whatever the background.

Sizes follow the paper's observation (Fig. 2) that much real data is small: a share ``small_share`` (≈40%) has its
shorter side below 256 px. Those are rendered ``render_scale`` times larger and downscaled (Lanczos), so they carry the
smooth, detail-poor look of real low-resolution photos when upscaled, rather than the hard edges of a native render.
Aspect ratios (height / width) are log-uniform over the bucket range 0.25–4.0.

Layout: ``<out_dir>/<chunk>/<index>.{png,jpg,txt,json}`` with ``<chunk>`` the first index of a folder of
``folder_size`` images, so keys (relative path without extension) look like ``00500/000523``.
"""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
from PIL import Image, ImageDraw

from pipeline import storage

OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 20),
    "green": (30, 190, 60),
    "cyan": (0, 210, 230),
    "purple": (140, 40, 210),
    "pink": (255, 105, 190),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "blue": (25, 35, 120),
    "brown": (105, 70, 40),
    "beige": (225, 210, 170),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
BACKGROUND_KINDS = ("plain", "gradient")
GRADIENT_DIRECTIONS = ("horizontal", "vertical", "diagonal")
# A gradient runs from the background colour to this fraction of it (a darker shade of the same hue).
GRADIENT_SHADE = 0.7
MIN_COLOR_DISTANCE = 80.0
# Object side as a fraction of the shorter image side: large enough that a 64-128 px training view shows its colour
# in whole latent cells (8×8 px each), not only in cells it shares with the background.
OBJECT_SIZE_RANGE = (0.3, 0.55)
CELL_MARGIN = 1 / 24  # an object centre keeps this far (fraction of the side) from the 3×3 cell borders
SMALL_SIDE = 256  # the paper's threshold (Fig. 2); `small_side` scales it for toy resolutions
PLACEMENTS = ("cells", "central")
# placement=central: the object's centre is drawn around the image centre with this standard deviation (a fraction
# of the side), as photographers frame a subject; Alg. 1 crops then cut or shift it (Fig. 5).
CENTRAL_SPREAD = 0.08
MIN_ASPECT, MAX_ASPECT = 0.25, 4.0
# Aspect ratios (h/w) as photo collections have them: mostly square and the camera formats, with a log-uniform tail
# over the whole App. I range so every bucket is exercised. (An all-log-uniform mix made most square training crops
# cut the object away from where its caption puts it.)
PHOTO_ASPECTS = {1.0: 0.40, 3 / 4: 0.15, 4 / 3: 0.15, 2 / 3: 0.07, 3 / 2: 0.07, 9 / 16: 0.03, 16 / 9: 0.03}
ASPECT_TAIL_SHARE = 0.10
POSITION_PHRASES = {
    ("top", "left"): "in the top left", ("top", "center"): "at the top", ("top", "right"): "in the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
MARKER_NAME = "_SUCCESS.json"
IN_PROGRESS_NAME = "_IN_PROGRESS.json"


def background_shades(color: tuple[int, int, int], steps: int = 16) -> np.ndarray:
    """Every colour a background of base ``color`` can show: the gradient from the colour to its darker shade."""
    t = np.linspace(0.0, 1.0, steps)[:, None]
    base = np.asarray(color, dtype=np.float64)
    return base * (1.0 - t) + base * GRADIENT_SHADE * t


def position_name(cx: float, cy: float) -> str:
    """The caption phrase for an object centre given as fractions of width and height (a 3×3 grid)."""
    row = "top" if cy < 1 / 3 else ("bottom" if cy >= 2 / 3 else "middle")
    col = "left" if cx < 1 / 3 else ("right" if cx >= 2 / 3 else "center")
    return POSITION_PHRASES[(row, col)]


def caption_for(params: dict) -> str:
    background = params["background"]
    style = " gradient" if params["background_kind"] == "gradient" else ""
    article = "an" if params["color"][0] in "aeiou" else "a"
    return (f"{article} {params['color']} {params['shape']} {position_name(params['cx'], params['cy'])} "
            f"on a {background}{style} background")


def _sample_size(rng: np.random.Generator, small: bool, min_side: int, max_side: int,
                 small_side: int = SMALL_SIDE) -> tuple[int, int, float]:
    """(height, width, aspect): aspect = h/w from ``PHOTO_ASPECTS`` or, for ``ASPECT_TAIL_SHARE`` of the images,
    log-uniform in [0.25, 4]; small → shorter side below ``small_side`` px."""
    if rng.random() < ASPECT_TAIL_SHARE:
        aspect = math.exp(rng.uniform(math.log(MIN_ASPECT), math.log(MAX_ASPECT)))
    else:
        weights = np.asarray(list(PHOTO_ASPECTS.values()))
        aspect = float(rng.choice(list(PHOTO_ASPECTS), p=weights / weights.sum()))
    long_over_short = max(aspect, 1 / aspect)
    if small:
        short = int(rng.integers(min_side, small_side))
        long = min(int(round(short * long_over_short)), max_side)
    else:
        # A large image keeps its shorter side ≥ small_side within max_side, which caps its aspect there.
        long_over_short = min(long_over_short, max_side / small_side)
        long_lo = int(math.ceil(small_side * long_over_short))
        long = int(rng.integers(long_lo, max_side + 1))
        short = max(small_side, int(long / long_over_short))
        long = max(long, short)
    h, w = (long, short) if aspect >= 1 else (short, long)
    return h, w, h / w


def sample_params(rng: np.random.Generator, index: int, seed: int, *, max_side: int = 1024, min_side: int = 64,
                  small_share: float = 0.4, jpeg_share: float = 0.5, render_scale: int = 4,
                  small_side: int = SMALL_SIDE, placement: str = "cells") -> dict:
    """All generator parameters of one image, drawn from ``rng`` only (pure: no I/O, no global state).
    ``placement``: ``cells`` = the object's centre uniform over the 3×3 cells (balanced positions for the
    prompt-following score); ``central`` = around the image centre, as in photos (crop-conditioning experiments)."""
    small = bool(rng.random() < small_share)
    h, w, aspect = _sample_size(rng, small, min_side, max_side, small_side)
    shape = str(rng.choice(SHAPES))
    color = str(rng.choice(list(OBJECT_COLORS)))
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    background_kind = str(rng.choice(BACKGROUND_KINDS))
    direction = str(rng.choice(GRADIENT_DIRECTIONS))
    # Object side as a fraction of the shorter image side; the centre keeps the whole object inside the image.
    size = float(rng.uniform(OBJECT_SIZE_RANGE[0], OBJECT_SIZE_RANGE[1]))
    half_x = size * min(h, w) / (2 * w)
    half_y = size * min(h, w) / (2 * h)
    centre = _sample_centre if placement == "cells" else _sample_central
    cx = centre(rng, half_x)
    cy = centre(rng, half_y)
    return {
        "index": index, "seed": seed, "shape": shape,
        "color": color, "color_rgb": list(OBJECT_COLORS[color]),
        "background": background, "background_rgb": list(BACKGROUND_COLORS[background]),
        "background_kind": background_kind, "gradient_direction": direction if background_kind == "gradient" else None,
        "cx": cx, "cy": cy, "size": size,
        "bbox": [cx - half_x, cy - half_y, cx + half_x, cy + half_y],  # x0, y0, x1, y1 as fractions of w, h
        "orig_h": h, "orig_w": w, "aspect": aspect,
        "rendered_large": small, "render_scale": render_scale if small else 1,
        "format": "JPEG" if rng.random() < jpeg_share else "PNG",
    }


def _sample_centre(rng: np.random.Generator, half: float) -> float:
    """A centre coordinate: first a third of the image (so positions are balanced), then a point in it that fits,
    kept ``CELL_MARGIN`` inside the third when the object allows, so that no caption names a cell its object only
    grazes (a label a model, or the prompt-following reader, could not get right from the pixels)."""
    third = int(rng.integers(0, 3))
    lo, hi = max(third / 3 + CELL_MARGIN, half), min((third + 1) / 3 - CELL_MARGIN, 1 - half)
    if lo > hi:  # a large object in a narrow image: fits only without the margin
        lo, hi = max(third / 3, half), min((third + 1) / 3, 1 - half)
    return float(rng.uniform(lo, hi))


def _sample_central(rng: np.random.Generator, half: float) -> float:
    """A centre coordinate near the middle (normal, sd ``CENTRAL_SPREAD``), clipped so the object stays inside."""
    return float(np.clip(rng.normal(0.5, CENTRAL_SPREAD), half, 1 - half)) if half < 0.5 else 0.5


def _background(h: int, w: int, params: dict) -> Image.Image:
    base = np.asarray(params["background_rgb"], dtype=np.float32)
    if params["background_kind"] == "plain":
        return Image.new("RGB", (w, h), tuple(int(c) for c in base))
    # A small gradient stretched bilinearly: the same linear ramp as a full-size one, at a fraction of the cost.
    n = 64
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    t = {"horizontal": np.broadcast_to(ramp[None, :], (n, n)), "vertical": np.broadcast_to(ramp[:, None], (n, n)),
         "diagonal": (ramp[None, :] + ramp[:, None]) / 2}[params["gradient_direction"]]
    pixels = base[None, None, :] * (1.0 - (1.0 - GRADIENT_SHADE) * t)[:, :, None]
    small = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    return small.resize((w, h), Image.Resampling.BILINEAR)


def shape_points(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (x, y) inside a box of half-side r."""
    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(x + radius * math.cos(start + 2 * math.pi * k / n), y + radius * math.sin(start + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(params: dict) -> Image.Image:
    """Draw the image described by ``params`` at its final size (small ones are drawn large, then downscaled)."""
    scale = int(params["render_scale"])
    h, w = params["orig_h"] * scale, params["orig_w"] * scale
    image = _background(h, w, params)
    draw = ImageDraw.Draw(image)
    x, y, r = params["cx"] * w, params["cy"] * h, params["size"] * min(h, w) / 2
    color = tuple(params["color_rgb"])
    if params["shape"] == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    else:
        draw.polygon(shape_points(params["shape"], x, y, r), fill=color)
    if scale != 1:
        # Box averaging of a supersampled render: the antialiased, detail-poor look of a real small photo.
        image = image.reduce(scale)
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=92)
    else:
        # Level 1: the demo set favours speed; PNG stays lossless either way.
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def segment_object(pixels: np.ndarray, color_rgb, tolerance: float = MIN_COLOR_DISTANCE / 2) -> np.ndarray:
    """Boolean mask of the pixels within ``tolerance`` (RGB distance) of the object colour; see the module doc."""
    diff = pixels[..., :3].astype(np.float32) - np.asarray(color_rgb, dtype=np.float32)
    return np.sqrt((diff * diff).sum(axis=-1)) < tolerance


def key_for(index: int, folder_size: int) -> str:
    return f"{(index // folder_size) * folder_size:05d}/{index:06d}"


def generate_demo_dataset(out_dir: str, n: int = 2000, seed: int = 0, *, max_side: int = 1024, min_side: int = 64,
                          small_share: float = 0.4, jpeg_share: float = 0.5, render_scale: int = 4,
                          folder_size: int = 500, small_side: int = SMALL_SIDE, placement: str = "cells") -> dict:
    """Write ``n`` images with captions and parameters under ``out_dir`` (local path or URI); same seed → same bytes.

    Returns a summary: counts, the share with the shorter side below ``small_side`` px, the formats, and the time.
    """
    _check_args(n=n, max_side=max_side, min_side=min_side, small_share=small_share, jpeg_share=jpeg_share,
                render_scale=render_scale, folder_size=folder_size, small_side=small_side, placement=placement)
    start = time.perf_counter()
    num_small = num_jpeg = 0
    for index in range(n):
        # One generator per image, seeded by (seed, index): an image does not depend on n or on the other images.
        rng = np.random.default_rng([seed, index])
        params = sample_params(rng, index, seed, max_side=max_side, min_side=min_side, small_share=small_share,
                               jpeg_share=jpeg_share, render_scale=render_scale, small_side=small_side,
                               placement=placement)
        stem = storage.join(out_dir, *key_for(index, folder_size).split("/"))
        ext = ".jpg" if params["format"] == "JPEG" else ".png"
        storage.write_bytes_atomic(stem + ext, encode(render(params), params["format"]))
        storage.write_bytes_atomic(stem + ".txt", caption_for(params).encode("utf-8"))
        storage.write_bytes_atomic(stem + ".json", json.dumps(params, sort_keys=True).encode("utf-8"))
        num_small += min(params["orig_h"], params["orig_w"]) < small_side
        num_jpeg += params["format"] == "JPEG"
    return {"out_dir": str(out_dir), "num_images": n, "num_small": int(num_small),
            "share_small": num_small / n if n else 0.0, "num_jpeg": int(num_jpeg), "num_png": int(n - num_jpeg),
            "seconds": round(time.perf_counter() - start, 3)}


def _check_args(*, n, max_side, min_side, small_share, jpeg_share, render_scale, folder_size,
                small_side=SMALL_SIDE, placement="cells") -> None:
    if n < 0:
        raise ValueError(f"n (demo.num_images) must be >= 0, got {n}")
    if placement not in PLACEMENTS:
        raise ValueError(f"demo.placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if not 8 <= min_side < small_side:
        raise ValueError(f"min_side must be in [8, small_side={small_side}), got {min_side}")
    if max_side < small_side:
        raise ValueError(f"max_side must be >= small_side={small_side}, got {max_side}")
    for name, value in (("small_share", small_share), ("jpeg_share", jpeg_share)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if render_scale < 1 or folder_size < 1:
        raise ValueError(f"render_scale and folder_size must be >= 1, got {render_scale}, {folder_size}")


def _generator_args(demo_cfg) -> dict:
    return {"n": int(demo_cfg.num_images), "seed": int(demo_cfg.seed), "max_side": int(demo_cfg.max_side),
            "min_side": int(demo_cfg.min_side), "small_share": float(demo_cfg.small_share),
            "jpeg_share": float(demo_cfg.jpeg_share), "render_scale": int(demo_cfg.render_scale),
            "folder_size": int(demo_cfg.folder_size), "small_side": int(demo_cfg.get("small_side", SMALL_SIDE)),
            "placement": str(demo_cfg.get("placement", "cells"))}


def run(cfg, ctx) -> dict:
    """Stage ``demo_data``: generate the demo set into ``cfg.demo.out_dir``; resumable through a completion marker.

    A marker with the same parameters means the set is complete and is kept. A folder left by an earlier run of this
    stage (either marker present) with other parameters is ours to replace. A non-empty folder without a marker is
    someone else's data, and is refused rather than overwritten.
    """
    out_dir = str(cfg.demo.out_dir)
    args = _generator_args(cfg.demo)
    marker, in_progress = storage.join(out_dir, MARKER_NAME), storage.join(out_dir, IN_PROGRESS_NAME)
    if storage.is_file(marker):
        done = storage.read_json(marker)
        if done.get("params") == args:
            return {**done["summary"], "skipped": True}
    if storage.is_file(marker) or storage.is_file(in_progress):
        if not storage.is_file(in_progress) or storage.read_json(in_progress) != args:
            storage.remove(out_dir)
    elif storage.list_files(out_dir, recursive=True):
        raise FileExistsError(f"demo.out_dir {out_dir} holds files that demo_data did not write; choose another "
                              "demo.out_dir or empty it")
    storage.write_json_atomic(in_progress, args)
    summary = generate_demo_dataset(out_dir, **args)
    storage.write_json_atomic(marker, {"params": args, "summary": summary})
    storage.remove(in_progress)
    ctx.log_metrics({"demo_num_images": summary["num_images"], "demo_share_small": summary["share_small"],
                     "demo_seconds": summary["seconds"]})
    return {**summary, "skipped": False}
