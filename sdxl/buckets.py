"""Multi-aspect buckets (SDXL App. I) and the rule that derives lower-resolution tables.

Aspect ratio here is height / width, as in the paper's table. Assignment uses the distance of log aspect
ratios, so 1:2 and 2:1 are equally far from 1:1, and anything beyond 0.25 or 4.0 lands in an edge bucket.
"""

from __future__ import annotations

import math
from functools import lru_cache

# (height, width) at ≈1024² pixels, in the order of App. I.
SDXL_BUCKETS_1024: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
MIN_ASPECT = 0.25
MAX_ASPECT = 4.0


@lru_cache(maxsize=64)
def bucket_table(resolution: int = 1024, multiple: int = 64) -> tuple[tuple[int, int], ...]:
    """The App. I table for a training resolution.

    Rule: scale each side by ``resolution / 1024`` (so the pixel budget scales by the square: ÷4 at 512, ÷16 at 256),
    round each side to the nearest ``multiple`` (64 px keeps latents a multiple of 8; the tiny preset uses a smaller
    multiple), never below one ``multiple``, then drop duplicates keeping the App. I order.
    """
    if resolution <= 0 or multiple <= 0:
        raise ValueError(f"resolution and multiple must be positive, got resolution={resolution}, multiple={multiple}")
    if resolution == 1024 and multiple == 64:
        return SDXL_BUCKETS_1024
    scale = resolution / 1024
    seen: dict[tuple[int, int], None] = {}
    for h, w in SDXL_BUCKETS_1024:
        hs = max(multiple, int(round(h * scale / multiple)) * multiple)
        ws = max(multiple, int(round(w * scale / multiple)) * multiple)
        seen.setdefault((hs, ws), None)
    return tuple(seen)


def aspect(h: float, w: float) -> float:
    return h / w


@lru_cache(maxsize=64)
def _log_aspects(table: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    return tuple(math.log(h / w) for h, w in table)


def nearest_bucket(height: int, width: int, table: tuple[tuple[int, int], ...] = SDXL_BUCKETS_1024) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to ``height / width``; ties go to the earlier bucket."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    target = math.log(height / width)
    logs = _log_aspects(table)
    best = min(range(len(table)), key=lambda i: (abs(logs[i] - target), i))
    return table[best]


def in_aspect_range(height: int, width: int, lo: float = MIN_ASPECT, hi: float = MAX_ASPECT) -> bool:
    return lo <= height / width <= hi


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def parse_bucket_name(name: str) -> tuple[int, int]:
    try:
        h, w = name.split("x")
        return int(h), int(w)
    except ValueError as err:
        raise ValueError(f"not a bucket name (expected HxW): {name!r}") from err
