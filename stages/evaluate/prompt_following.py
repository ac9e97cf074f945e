"""Known-answer prompt following for models trained on the demo data (stages/data/demo_data.py).

Every demo caption names an object colour, a shape, a position (a cell of a 3×3 grid) and a background colour, and the
generator's palettes are built so that pixels alone tell them apart: object colours stay ≥ ``MIN_COLOR_DISTANCE``
(RGB) away from every shade a background can take. So a generated image can be *read* without any learned network:

- background colour: the border pixels vote for the nearest background palette colour (over the shades of its
  gradient); the majority wins;
- object pixels: those farther than half that distance from every shade of the winning background;
- object colour: the object pixels vote for the nearest object palette colour;
- position: the centre of the winning colour's pixels (midpoint of their 2nd and 98th percentiles, robust to stray
  pixels and unbiased for a triangle, unlike the centroid) → the 3×3 cell, with the thirds the generator captions by;
- shape: the outline (circle, square, triangle, diamond, star, hexagon) that best overlaps the object's largest blob
  when fitted to its box (shape_reader.py); none when no outline fits.

Scores are accuracies against the prompt, next to their chance levels (1/7, 1/6, 1/9, 1/6). A coarser measure,
``background_lightness_auc``, asks only whether backgrounds prompted light (white, beige) are drawn lighter than those
prompted dark (black, blue, brown): over every such pair of images, the share in which the light one's border is
brighter (chance 0.5). A young model gets the lightness right long before the exact hue, so this is the measure a
short learning check can hold to (pipeline/conf/stage/learning_check.yaml). Validated on real demo images,
which it reads almost perfectly (tests/evaluate/test_prompt_following.py; ``validate_on_demo_images``).
Held-out prompts are drawn from the generator's vocabulary and exclude every caption of the training data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from stages.data.demo_data import (BACKGROUND_COLORS, BACKGROUND_KINDS, MIN_COLOR_DISTANCE, OBJECT_COLORS,
                                   POSITION_PHRASES, SHAPES, background_shades, caption_for)
from stages.evaluate.shape_reader import read_shape

ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
CELL_OF_PHRASE = {phrase: cell for cell, phrase in POSITION_PHRASES.items()}
CHANCE = {"object_color": 1 / len(OBJECT_COLORS), "background": 1 / len(BACKGROUND_COLORS),
          "position": 1 / len(POSITION_PHRASES), "shape": 1 / len(SHAPES)}
# Rec. 601 luma; backgrounds whose palette colour is above / below mid-gray count as light / dark (gray is neither).
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
LIGHT_BACKGROUNDS = tuple(n for n, rgb in BACKGROUND_COLORS.items() if float(np.dot(rgb, _LUMA)) > 140)
DARK_BACKGROUNDS = tuple(n for n, rgb in BACKGROUND_COLORS.items() if float(np.dot(rgb, _LUMA)) < 110)
MIN_OBJECT_SHARE = 0.002  # below this share of the image the object counts as absent (e.g. 8 px at 64²)
BORDER_PX = 2


@dataclass(frozen=True)
class PromptSpec:
    """What a demo prompt asks for (the generator's own parameters, without the geometry details)."""

    color: str
    shape: str
    background: str
    background_kind: str
    row: str
    col: str

    @property
    def prompt(self) -> str:
        # The generator's caption of an object centred in the requested cell: one template for data and prompts.
        cx = (COLS.index(self.col) + 0.5) / 3
        cy = (ROWS.index(self.row) + 0.5) / 3
        return caption_for({"color": self.color, "shape": self.shape, "background": self.background,
                            "background_kind": self.background_kind, "cx": cx, "cy": cy})


@dataclass(frozen=True)
class Reading:
    """What an image shows: None where the reader finds nothing (no object pixels)."""

    background: str
    object_color: str | None
    row: str | None
    col: str | None
    object_share: float
    border_lightness: float  # mean luma of the border pixels, 0-255
    shape: str | None = None


_BG_NAMES = list(BACKGROUND_COLORS)
_BG_SHADES = np.stack([background_shades(BACKGROUND_COLORS[name]) for name in _BG_NAMES])  # [B, S, 3]
_OBJ_NAMES = list(OBJECT_COLORS)
_OBJ_RGB = np.asarray([OBJECT_COLORS[name] for name in _OBJ_NAMES], dtype=np.float32)  # [O, 3]


def _distance_to_shades(pixels: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """[N, 3] pixels, [..., S, 3] shades → [..., N] distance of each pixel to its nearest shade."""
    diff = pixels[None, :, None, :] - shades.reshape(-1, 1, shades.shape[-2], 3)
    dist = np.sqrt((diff * diff).sum(-1)).min(-1)
    return dist.reshape(shades.shape[:-2] + (pixels.shape[0],))


def _background_and_object(pixels: np.ndarray) -> tuple[int, float, np.ndarray]:
    """(index of the background colour voted by the border, the border's mean luma, flat mask of the pixels that
    are not that background: the object, whatever its colour)."""
    border = np.concatenate([pixels[:BORDER_PX].reshape(-1, 3), pixels[-BORDER_PX:].reshape(-1, 3),
                             pixels[:, :BORDER_PX].reshape(-1, 3), pixels[:, -BORDER_PX:].reshape(-1, 3)])
    votes = np.bincount(_distance_to_shades(border, _BG_SHADES).argmin(0), minlength=len(_BG_NAMES))
    background = int(votes.argmax())
    lightness = float((border @ _LUMA).mean())
    flat = pixels.reshape(-1, 3)
    off_background = _distance_to_shades(flat, _BG_SHADES[background][None])[0] > MIN_COLOR_DISTANCE / 2
    return background, lightness, off_background


def object_mask(image) -> np.ndarray | None:
    """H×W mask of the object of a demo-style image: every pixel away from its background's shades, whatever the
    object's colour (so it measures where an object was drawn even when its colour is wrong); None when there is
    less than ``MIN_OBJECT_SHARE`` of such pixels."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)[..., :3]
    _, _, off_background = _background_and_object(pixels)
    if off_background.mean() < MIN_OBJECT_SHARE:
        return None
    return off_background.reshape(pixels.shape[:2])


def read_image(image) -> Reading:
    """Read background colour, object colour and position cell from an RGB image (PIL image or uint8 [H, W, 3])."""
    pixels = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)[..., :3]
    if pixels.ndim != 3 or min(pixels.shape[:2]) <= 2 * BORDER_PX:
        raise ValueError(f"expected an RGB image larger than {2 * BORDER_PX} px a side, got shape {pixels.shape}")
    h, w = pixels.shape[:2]
    background, lightness, off_background = _background_and_object(pixels)
    flat = pixels.reshape(-1, 3)
    share = float(off_background.mean())
    if share < MIN_OBJECT_SHARE:
        return Reading(_BG_NAMES[background], None, None, None, share, lightness)
    candidates = flat[off_background]
    nearest = np.sqrt(((candidates[:, None, :] - _OBJ_RGB[None]) ** 2).sum(-1)).argmin(1)
    color = int(np.bincount(nearest, minlength=len(_OBJ_NAMES)).argmax())
    ys, xs = np.nonzero(off_background.reshape(h, w))
    mine = nearest == color
    ys, xs = ys[mine], xs[mine]
    cy = (np.percentile(ys, 2) + np.percentile(ys, 98) + 1) / 2 / h
    cx = (np.percentile(xs, 2) + np.percentile(xs, 98) + 1) / 2 / w
    row = ROWS[min(2, int(cy * 3))]
    col = COLS[min(2, int(cx * 3))]
    shape = read_shape(off_background.reshape(h, w))
    return Reading(_BG_NAMES[background], _OBJ_NAMES[color], row, col, share, lightness, shape)


def score(readings: Iterable[Reading], specs: Iterable[PromptSpec]) -> dict:
    """Accuracies of ``readings`` against what ``specs`` asked for, with chance levels and the count."""
    pairs = list(zip(readings, specs, strict=True))
    if not pairs:
        raise ValueError("no images to score")
    n = len(pairs)
    object_color = sum(r.object_color == s.color for r, s in pairs) / n
    background = sum(r.background == s.background for r, s in pairs) / n
    position = sum((r.row, r.col) == (s.row, s.col) for r, s in pairs) / n
    shape = sum(r.shape == s.shape for r, s in pairs) / n
    return {"object_color_accuracy": object_color, "background_accuracy": background, "position_accuracy": position,
            "shape_accuracy": shape, "object_color_chance": CHANCE["object_color"],
            "background_chance": CHANCE["background"], "position_chance": CHANCE["position"],
            "shape_chance": CHANCE["shape"], "num_images": n,
            "background_lightness_auc": lightness_auc(pairs), "background_lightness_chance": 0.5}


def chance_key(score_name: str) -> str:
    """The key of a score's chance level in :func:`score`'s result: background_accuracy → background_chance,
    background_lightness_auc → background_lightness_chance."""
    return score_name.replace("_accuracy", "_chance").replace("_auc", "_chance")


def lightness_auc(pairs: list[tuple[Reading, PromptSpec]]) -> float | None:
    """Over every (light-prompted, dark-prompted) pair of images, the share where the light one's border is brighter
    (ties count half): the Mann-Whitney AUC. None without both kinds of prompt."""
    light = np.asarray([r.border_lightness for r, s in pairs if s.background in LIGHT_BACKGROUNDS])
    dark = np.asarray([r.border_lightness for r, s in pairs if s.background in DARK_BACKGROUNDS])
    if not len(light) or not len(dark):
        return None
    diff = light[:, None] - dark[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def heldout_specs(count: int, seed: int = 0, exclude_prompts: Iterable[str] = ()) -> list[PromptSpec]:
    """``count`` prompt specs from the vocabulary, none of whose prompts is in ``exclude_prompts`` (the training
    captions). Cells cycle through the 3×3 grid (balanced positions); colours, shape, background are uniform."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    excluded = set(exclude_prompts)
    rng = np.random.default_rng(seed)
    cells = list(POSITION_PHRASES)
    specs: list[PromptSpec] = []
    for attempt in range(100 * count):
        if len(specs) == count:
            break
        row, col = cells[len(specs) % len(cells)]
        spec = PromptSpec(color=_OBJ_NAMES[rng.integers(len(_OBJ_NAMES))], shape=SHAPES[rng.integers(len(SHAPES))],
                          background=_BG_NAMES[rng.integers(len(_BG_NAMES))],
                          background_kind=BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))], row=row, col=col)
        if spec.prompt not in excluded:
            specs.append(spec)
    if len(specs) < count:
        raise ValueError(f"could not draw {count} prompts outside the {len(excluded)} excluded ones")
    return specs


def spec_from_caption(caption: str) -> PromptSpec | None:
    """Parse a demo caption (``caption_for``'s template) back into its spec; None for any other text."""
    text = str(caption).strip()
    for article in ("a ", "an "):
        if text.startswith(article):
            text = text[len(article):]
            break
    else:
        return None
    words = text.split(" ", 2)
    if len(words) < 3 or words[0] not in OBJECT_COLORS or words[1] not in SHAPES:
        return None
    color, shape, rest = words
    for phrase, (row, col) in CELL_OF_PHRASE.items():
        if rest.startswith(phrase + " on a "):
            tail = rest[len(phrase) + len(" on a "):]
            for kind, suffix in (("gradient", " gradient background"), ("plain", " background")):
                background = tail[:-len(suffix)] if tail.endswith(suffix) else None
                if background in BACKGROUND_COLORS:
                    return PromptSpec(color, shape, background, kind, row, col)
    return None


def spec_from_params(params: dict) -> PromptSpec:
    """The spec a demo image's generator parameters describe (its sidecar JSON)."""
    row, col = CELL_OF_PHRASE[_position_phrase(params["cx"], params["cy"])]
    return PromptSpec(color=params["color"], shape=params["shape"], background=params["background"],
                      background_kind=params["background_kind"], row=row, col=col)


def _position_phrase(cx: float, cy: float) -> str:
    from stages.data.demo_data import position_name

    return position_name(cx, cy)


def labelled_grid(images: list, specs: list[PromptSpec], readings: list[Reading], columns: int = 8,
                  tile: int = 128):
    """A PIL grid: each image enlarged to ``tile`` px with what was asked and a mark per attribute
    (C colour, B background, P position, S shape; green = read as asked, red = not)."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no images for the grid")
    label_h = 30
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * (tile + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, spec, reading) in enumerate(zip(images, specs, readings, strict=True)):
        x, y = (i % columns) * tile, (i // columns) * (tile + label_h)
        grid.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 2, y + tile + 1), f"{spec.color} {spec.shape}", fill=(0, 0, 0))
        draw.text((x + 2, y + tile + 15), f"{spec.row[0]}{spec.col[0]} / {spec.background}", fill=(0, 0, 0))
        marks = (("C", reading.object_color == spec.color), ("B", reading.background == spec.background),
                 ("P", (reading.row, reading.col) == (spec.row, spec.col)), ("S", reading.shape == spec.shape))
        for j, (letter, ok) in enumerate(marks):
            draw.text((x + tile - 40 + 10 * j, y + tile + 15), letter, fill=(0, 150, 0) if ok else (200, 0, 0))
    return grid


def reading_dict(reading: Reading) -> dict:
    return asdict(reading)
