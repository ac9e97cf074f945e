"""Validation of ``POST /generate`` bodies: pure Python, no Ray, no torch.

:func:`parse_generate_request` turns a decoded JSON body into a :class:`GenerateRequest` with every default
resolved, or raises :class:`RequestError` naming the offending field. The HTTP layer maps that error to a 4xx, so a bad
request never reaches a model (and never takes a replica down).

Conventions (as in the SDXL paper and the public pipelines): sizes are ``[height, width]`` pairs, crop coordinates
``[top, left]``; ``num_images`` images of one request use the seeds ``seed, seed + 1, ...`` so each image can be
reproduced alone.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

FORMATS = ("png", "jpeg")
REFINER_MODES = ("sdedit", "ensemble")
MAX_SEED = 2**53  # the largest integer a browser's JSON numbers keep exactly
_MAX_MICRO_COND = 65536  # micro-conditioning sizes/offsets beyond this are surely a mistake
_MAX_SCORE = 10.0  # aesthetic scores are on the LAION 1–10 scale

FIELDS = (
    "prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "num_images", "refiner",
    "refiner_strength", "high_noise_frac", "original_size", "crop_coords", "target_size", "aesthetic_score",
    "negative_aesthetic_score", "sampler", "format",
)


class RequestError(ValueError):
    """A request the server refuses; ``field`` names the offending JSON field (None for the body as a whole)."""

    def __init__(self, field_name: str | None, message: str, status: int = 422):
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.message = str(self)
        self.status = status

    def to_json(self) -> dict:
        return {"error": self.message, "field": self.field}


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for (``cfg.serve``: max_side, max_pixels, max_steps, max_images)."""

    max_side: int = 2048
    max_pixels: int = 1024 * 1024  # the bucket table's pixel budget
    max_steps: int = 100
    max_images: int = 4
    size_multiple: int = 8  # the VAE downsamples by 8: pixel sizes must map to whole latents
    max_prompt_chars: int = 4000
    samplers: tuple[str, ...] = ("euler",)

    def __post_init__(self):
        for name in ("max_side", "max_pixels", "max_steps", "max_images", "size_multiple", "max_prompt_chars"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"serve.{name} must be positive, got {getattr(self, name)!r}")
        if not self.samplers:
            raise ValueError("ServeLimits.samplers must name at least one sampler")


@dataclass(frozen=True)
class RequestDefaults:
    """Values used for fields a request leaves out (``cfg.serve.request_defaults``)."""

    negative_prompt: str | None = None  # None: the model's unconditional input (zeros base, "" refiner)
    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance_scale: float = 5.0
    num_images: int = 1
    refiner: bool = False
    refiner_strength: float = 0.3
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    sampler: str = "euler"
    format: str = "png"


@dataclass(frozen=True)
class GenerateRequest:
    """A fully resolved generation request (every default filled in, every value checked)."""

    prompt: str
    negative_prompt: str | None  # None = the model's unconditional input; a string (even "") is encoded
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    refiner: bool
    refiner_mode: str  # "sdedit" (refiner_strength) or "ensemble" (high_noise_frac); meaningful when refiner
    refiner_strength: float | None
    high_noise_frac: float | None
    original_size: tuple[int, int]
    crop_coords: tuple[int, int]
    target_size: tuple[int, int]
    aesthetic_score: float
    negative_aesthetic_score: float
    sampler: str
    format: str
    seed_was_random: bool = field(default=False, compare=False)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]

    @property
    def base_end_frac(self) -> float:
        """Fraction of the schedule the base model runs: all of it, unless the refiner takes over (ensemble)."""
        return self.high_noise_frac if (self.refiner and self.refiner_mode == "ensemble") else 1.0

    def base_batch_key(self) -> tuple:
        """Requests with equal keys can share one base-sampler batch (same latent shape and schedule)."""
        return ("base", self.height, self.width, self.steps, self.sampler, self.guidance_scale, self.base_end_frac)

    def refiner_batch_key(self) -> tuple:
        strength = self.refiner_strength if self.refiner_mode == "sdedit" else self.high_noise_frac
        return ("refiner", self.height, self.width, self.steps, self.sampler, self.guidance_scale,
                self.refiner_mode, strength)

    def decode_batch_key(self) -> tuple:
        return ("decode", self.height, self.width)

    def resolved(self) -> dict:
        """The parameters as the server used them (returned to the client, JSON-able)."""
        out = asdict(self)
        out.pop("seed_was_random")
        out["seeds"] = self.seeds
        for name in ("original_size", "crop_coords", "target_size"):
            out[name] = list(out[name])
        if not self.refiner:
            out["refiner_mode"] = out["refiner_strength"] = out["high_noise_frac"] = None
        elif self.refiner_mode == "sdedit":
            out["high_noise_frac"] = None
        else:
            out["refiner_strength"] = None
        return out

    def with_seed(self, seed: int, num_images: int = 1) -> "GenerateRequest":
        return replace(self, seed=seed, num_images=num_images)


# ---- field checks ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, default: Any, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if not _is_int(value):
        raise RequestError(name, f"must be an integer, got {type(value).__name__} {value!r:.60}")
    if not lo <= value <= hi:
        raise RequestError(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _float(body: dict, name: str, default: Any, lo: float, hi: float, *, lo_open: bool = False,
           hi_open: bool = False) -> float:
    value = body.get(name, default)
    if not (_is_int(value) or isinstance(value, float)):
        raise RequestError(name, f"must be a number, got {type(value).__name__} {value!r:.60}")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(name, f"must be a finite number, got {value}")
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise RequestError(name, f"must be in {left}{lo}, {hi}{right}, got {value}")
    return value


def _str(body: dict, name: str, default: Any, max_chars: int) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise RequestError(name, f"must be at most {max_chars} characters, got {len(value)}")
    return value


def _choice(body: dict, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or value not in choices:
        raise RequestError(name, f"must be one of {list(choices)}, got {value!r:.60}")
    return value


def _pair(body: dict, name: str, default: tuple[int, int], lo: int) -> tuple[int, int]:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise RequestError(name, f"must be a list of two integers [height, width] or [top, left], got {value!r:.60}")
    if not all(lo <= v <= _MAX_MICRO_COND for v in value):
        raise RequestError(name, f"values must be between {lo} and {_MAX_MICRO_COND}, got {list(value)}")
    return int(value[0]), int(value[1])


def _size(body: dict, name: str, default: int, limits: ServeLimits) -> int:
    value = _int(body, name, default, 1, 2**31)
    if value > limits.max_side:
        raise RequestError(name, f"must be at most serve.max_side={limits.max_side}, got {value}")
    if value % limits.size_multiple:
        raise RequestError(name, f"must be a multiple of {limits.size_multiple}, got {value}")
    return value


def _refiner_settings(body: dict, defaults: RequestDefaults) -> tuple[bool, str, float | None, float | None]:
    refiner = body.get("refiner", defaults.refiner)
    if not isinstance(refiner, bool):
        raise RequestError("refiner", f"must be true or false, got {refiner!r:.60}")
    has_strength = body.get("refiner_strength") is not None
    has_frac = body.get("high_noise_frac") is not None
    if has_strength and has_frac:
        raise RequestError("high_noise_frac", "give refiner_strength (SDEdit) or high_noise_frac (ensemble of "
                                              "experts), not both")
    if has_frac:
        frac = _float(body, "high_noise_frac", None, 0.0, 1.0, lo_open=True, hi_open=True)
        return refiner, "ensemble", None, frac
    strength = _float(body, "refiner_strength", defaults.refiner_strength, 0.0, 1.0, lo_open=True)
    return refiner, "sdedit", strength, None


def parse_generate_request(body: Any, limits: ServeLimits, defaults: RequestDefaults,
                           rng: random.Random | None = None) -> GenerateRequest:
    """Check a decoded JSON body and resolve its defaults; raises :class:`RequestError` naming the field.

    A missing (or null) ``seed`` is drawn from ``rng`` (a fresh system-seeded one by default) and returned in the
    response so the image can be reproduced.
    """
    if not isinstance(body, dict):
        raise RequestError(None, f"the body must be a JSON object, got {type(body).__name__}", status=400)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field (known fields: {', '.join(FIELDS)})")
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("prompt", "is required")
    prompt = _str(body, "prompt", None, limits.max_prompt_chars)
    if not prompt.strip():
        raise RequestError("prompt", "must not be empty")
    negative_prompt = None
    if body.get("negative_prompt", defaults.negative_prompt) is not None:
        negative_prompt = _str(body, "negative_prompt", defaults.negative_prompt, limits.max_prompt_chars)

    width = _size(body, "width", defaults.width, limits)
    height = _size(body, "height", defaults.height, limits)
    if width * height > limits.max_pixels:
        raise RequestError("width", f"width x height = {width}x{height} = {width * height} pixels exceeds the "
                                    f"bucket pixel budget serve.max_pixels={limits.max_pixels}")
    steps = _int(body, "steps", defaults.steps, 1, limits.max_steps)
    guidance = _float(body, "guidance_scale", defaults.guidance_scale, 0.0, 100.0)
    num_images = _int(body, "num_images", defaults.num_images, 1, limits.max_images)

    seed_value = body.get("seed")
    seed_was_random = seed_value is None
    if seed_was_random:
        seed = (rng or random.SystemRandom()).randrange(0, 2**31)
    else:
        seed = _int(body, "seed", None, 0, MAX_SEED - limits.max_images)

    refiner, mode, strength, frac = _refiner_settings(body, defaults)
    if refiner and mode == "sdedit" and int(steps * strength) < 1:
        # SDEdit runs the last int(steps * strength) steps of the schedule (diffusers' img2img rule).
        raise RequestError("refiner_strength", f"refiner_strength={strength} with steps={steps} leaves the refiner "
                                               "no step (needs steps * refiner_strength >= 1)")
    sampler = _choice(body, "sampler", defaults.sampler, tuple(limits.samplers))
    fmt = _choice(body, "format", defaults.format, FORMATS)
    return GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        num_images=num_images,
        refiner=refiner,
        refiner_mode=mode,
        refiner_strength=strength,
        high_noise_frac=frac,
        original_size=_pair(body, "original_size", (height, width), 1),
        crop_coords=_pair(body, "crop_coords", (0, 0), 0),
        target_size=_pair(body, "target_size", (height, width), 1),
        aesthetic_score=_float(body, "aesthetic_score", defaults.aesthetic_score, 0.0, _MAX_SCORE),
        negative_aesthetic_score=_float(body, "negative_aesthetic_score", defaults.negative_aesthetic_score, 0.0,
                                        _MAX_SCORE),
        sampler=sampler,
        format=fmt,
        seed_was_random=seed_was_random,
    )


def limits_from_config(serve_cfg: Any, samplers: tuple[str, ...], max_pixels: int) -> ServeLimits:
    """ServeLimits from ``cfg.serve`` (a DictConfig or a dict); ``max_pixels`` comes from the bucket table unless
    ``serve.max_pixels`` overrides it."""
    get = serve_cfg.get
    return ServeLimits(
        max_side=int(get("max_side", 2048)),
        max_pixels=int(get("max_pixels") or max_pixels),
        max_steps=int(get("max_steps", 100)),
        max_images=int(get("max_images", 4)),
        size_multiple=int(get("size_multiple", 8)),
        samplers=tuple(samplers),
    )


def defaults_from_config(defaults_cfg: Any) -> RequestDefaults:
    """RequestDefaults from ``cfg.serve.request_defaults``; unknown keys are refused so typos surface at start-up."""
    values = dict(defaults_cfg or {})
    known = set(RequestDefaults.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"serve.request_defaults has unknown keys {unknown}; known: {sorted(known)}")
    return RequestDefaults(**values)
