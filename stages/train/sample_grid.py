"""A grid PNG of a task's fixed-prompt samples, logged every ``train.sample_every`` steps."""

from __future__ import annotations

import io
import math

from PIL import Image


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile ``images`` (any sizes) row-major into one RGB image; each cell is as large as the largest image."""
    if not images:
        raise ValueError("make_grid needs at least one image; the task's sample_images returned none")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x = pad + c * (cell_w + pad) + (cell_w - im.width) // 2
        y = pad + r * (cell_h + pad) + (cell_h - im.height) // 2
        grid.paste(im.convert("RGB"), (x, y))
    return grid


def grid_png_bytes(images: list[Image.Image], cols: int | None = None) -> bytes:
    buf = io.BytesIO()
    make_grid(images, cols).save(buf, format="PNG")
    return buf.getvalue()


def sample_artifact_name(step: int) -> str:
    """File name the grid is logged under, inside the run's ``samples/`` artifact folder."""
    return f"step_{step:06d}.png"
