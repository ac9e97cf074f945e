"""Alg. 1 of the SDXL report: resize, crop, and record what was done as conditioning (Sec. 2.2).

An image of size (H, W) going to a target (h, w) is resized by ``max(h / H, w / W)`` so it just covers the
target — for a square target that makes the *shorter* side match, as Alg. 1 says — and is then cropped along the
axis that overflows. The crop offset on that axis is uniform over every valid position (``center`` mode takes the
middle, for evaluation); the other axis fits exactly, so its offset is 0.

What is recorded (:class:`CropInfo`), in the units sgm and diffusers use:
- ``c_size`` = (H, W), the image's size *before* resizing (so small images stay tagged as small);
- ``c_crop`` = (top, left) of the crop window in the *resized* image's pixels;
- ``c_target`` = (h, w).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CROP_MODES = ("random", "center")


@dataclass(frozen=True)
class CropInfo:
    c_size: tuple[int, int]  # (orig_h, orig_w)
    c_crop: tuple[int, int]  # (top, left) in resized-image pixels
    c_target: tuple[int, int]  # (h, w)

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """The base UNet's micro-conditioning order: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        return (*self.c_size, *self.c_crop, *self.c_target)


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or a [C, H, W] tensor / array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, (torch.Tensor, np.ndarray)):
        if image.ndim != 3:
            raise ValueError(f"image tensor must be [C, H, W], got shape {tuple(image.shape)}")
        return int(image.shape[1]), int(image.shape[2])
    raise TypeError(f"image must be a PIL.Image or a [C, H, W] tensor, got {type(image).__name__}")


def _check_target(target) -> tuple[int, int]:
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        target = (int(target), int(target))
    try:
        h, w = (int(v) for v in target)
    except (TypeError, ValueError) as err:
        raise ValueError(f"target must be an int or a (height, width) pair, got {target!r}") from err
    if h <= 0 or w <= 0:
        raise ValueError(f"target sides must be positive, got {(h, w)}")
    return h, w


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size after resizing ``size`` by ``max(h/H, w/W)``: at least ``target`` on both axes, equal on one."""
    (H, W), (h, w) = size, target
    if H <= 0 or W <= 0:
        raise ValueError(f"image size must be positive, got {(H, W)}")
    scale = max(h / H, w / W)
    # The axis that sets the scale lands on its target exactly; max() guards the other against rounding down.
    return max(h, int(round(H * scale))), max(w, int(round(W * scale)))


def resize(image, size: tuple[int, int]):
    """Resize a PIL image (bicubic) or a [C, H, W] tensor (bicubic, antialiased) to ``size`` = (h, w)."""
    h, w = size
    if isinstance(image, Image.Image):
        if (image.height, image.width) == (h, w):
            return image
        return image.resize((w, h), Image.Resampling.BICUBIC)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if tuple(image.shape[1:]) == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
    if image.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.to(image.dtype)


def crop(image, top: int, left: int, height: int, width: int):
    """The window [top, top+height) × [left, left+width) of a PIL image or [C, H, W] tensor."""
    H, W = image_size(image)
    if top < 0 or left < 0 or top + height > H or left + width > W:
        raise ValueError(f"crop window (top={top}, left={left}, {height}x{width}) exceeds the image {H}x{W}")
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + width, top + height))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    return image[:, top:top + height, left:left + width]


def _uniform_offset(rng, high: int) -> int:
    """Uniform integer in [0, high] from a random.Random, numpy Generator or torch.Generator."""
    if high <= 0:
        return 0
    if isinstance(rng, torch.Generator):
        return int(torch.randint(0, high + 1, (1,), generator=rng))
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high + 1))
    if isinstance(rng, random.Random):
        return rng.randint(0, high)
    raise TypeError(f"rng must be random.Random, numpy.random.Generator or torch.Generator, got {type(rng).__name__}")


def bucket_crop_resize(image, bucket, rng=None, mode: str = "random"):
    """Resize ``image`` to cover ``bucket`` = (h, w), crop it to exactly that size; return (image, CropInfo).

    ``rng`` drives the crop offset in ``random`` mode (``None`` uses a fresh, unseeded ``random.Random``);
    ``center`` mode is deterministic and ignores it.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"mode must be one of {CROP_MODES}, got {mode!r}")
    target = _check_target(bucket)
    orig = image_size(image)
    if orig[0] <= 0 or orig[1] <= 0:
        raise ValueError(f"image is empty: size {orig}")
    resized_size = cover_size(orig, target)
    spare_h, spare_w = resized_size[0] - target[0], resized_size[1] - target[1]
    if mode == "center":
        top, left = spare_h // 2, spare_w // 2
    else:
        rng = rng if rng is not None else random.Random()
        top, left = _uniform_offset(rng, spare_h), _uniform_offset(rng, spare_w)
    out = crop(resize(image, resized_size), top, left, *target)
    return out, CropInfo(c_size=orig, c_crop=(top, left), c_target=target)


def random_crop_resize(image, target, rng=None, mode: str = "random"):
    """Alg. 1 for a square (``int``) or rectangular ``(h, w)`` target; see :func:`bucket_crop_resize`."""
    return bucket_crop_resize(image, _check_target(target), rng=rng, mode=mode)
