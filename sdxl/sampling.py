"""Sampling with the base and refiner UNets (Sec. 2.5, Fig. 1), step for step what diffusers' SDXL pipelines do.

- :func:`sample_base` — text-to-latents with the base model and classifier-free guidance.
- :func:`refine_sdedit` — the paper's two-stage mode: noise the base latents part of the way (``strength``, as
  diffusers' Img2Img pipeline applies it) and let the refiner denoise them with the same prompt.
- :func:`ensemble_of_experts` — the base handles the first ``high_noise_frac`` of the schedule, the refiner the rest
  (diffusers' ``denoising_end`` / ``denoising_start``).
- :func:`decode_latents` — VAE decode, always in float32.

Micro-conditioning at sampling comes from the parameters, which replace the ``time_ids`` already in a
:class:`Conditioning` (one source of truth per request): base ``(orig_h, orig_w, crop_top, crop_left, target_h,
target_w)``, with optional ``negative_*`` values for the unconditional branch (default: the same, as in diffusers and
sgm); refiner ``(orig_h, orig_w, crop_top, crop_left, aesthetic_score)`` with the negative aesthetic score for the
unconditional branch. ``uncond`` must be the model's unconditional input — what training dropped the text to (zeros
for the base, the encoding of "" for the refiner): ``TextConditioner.encode_for_sampling`` returns it when no negative
prompt is given. Initial noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)`` (as diffusers'
``randn_tensor`` does for a CPU generator), so a seed gives the same image on any device.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from sdxl.conditioner import Conditioning, base_time_ids, refiner_time_ids
from sdxl.diffusion import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, REFINER_T_RANGE, check_conditioning
from sdxl.guidance import GuidedDenoiser, check_guidance_scale, module_device
from sdxl.latent_scale import vae_scaling_factor

SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m")
LATENT_DOWNSAMPLE = 8
LATENT_CHANNELS = 4

# The SDXL checkpoints' scheduler config (the training schedule, "leading" spacing with offset 1).
SDXL_SCHEDULE_CONFIG = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def _check_int(value, name: str, minimum: int, multiple: int = 1) -> int:
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral)
                                       or isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or value % multiple:
        rule = f"a multiple of {multiple} >= {max(minimum, multiple)}" if multiple > 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {rule}, got {value}")
    return value


def _check_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """A (height, width)-style pair of integers >= ``minimum``; errors name the field."""
    try:
        a, b = value
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a pair of integers, got {value!r}") from err
    return _check_int(a, name, minimum), _check_int(b, name, minimum)


@dataclass
class SampleParams:
    """One base sampling request. ``original_size`` and ``target_size`` default to (height, width)."""

    height: int = 1024
    width: int = 1024
    steps: int = 50
    guidance_scale: float = 5.0
    sampler: str = "euler"
    seed: int = 0
    original_size: tuple[int, int] | None = None
    crop_coords: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop_coords: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    latent_downsample: int = LATENT_DOWNSAMPLE  # pixels per latent of the VAE that decodes (vae_downsample(vae))

    def __post_init__(self):
        self.latent_downsample = _check_int(self.latent_downsample, "latent_downsample", 1)
        self.height = _check_int(self.height, "height", 1, self.latent_downsample)
        self.width = _check_int(self.width, "width", 1, self.latent_downsample)
        _check_run_fields(self)
        size = (self.height, self.width)
        self.original_size = _check_pair(self.original_size or size, "original_size", 1)
        self.target_size = _check_pair(self.target_size or size, "target_size", 1)
        self.negative_original_size = _check_pair(self.negative_original_size or self.original_size,
                                                  "negative_original_size", 1)
        self.negative_target_size = _check_pair(self.negative_target_size or self.target_size,
                                                "negative_target_size", 1)
        self.negative_crop_coords = _check_pair(self.negative_crop_coords or self.crop_coords,
                                                "negative_crop_coords", 0)

    def time_ids(self, batch: int, negative: bool = False) -> torch.Tensor:
        if negative:
            return base_time_ids(self.negative_original_size, self.negative_crop_coords, self.negative_target_size,
                                 batch)
        return base_time_ids(self.original_size, self.crop_coords, self.target_size, batch)


def _check_run_fields(params) -> None:
    """Checks shared by base and refiner parameters: steps, guidance, sampler, seed, crop_coords."""
    params.steps = _check_int(params.steps, "steps", 1)
    params.guidance_scale = check_guidance_scale(params.guidance_scale)
    if params.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {params.sampler!r}")
    params.seed = _check_int(params.seed, "seed", 0)
    if params.seed >= 2**63:  # torch.Generator.manual_seed takes a signed 64-bit value
        raise ValueError(f"seed must be < 2**63, got {params.seed}")
    params.crop_coords = _check_pair(params.crop_coords, "crop_coords", 0)


def make_scheduler(name: str):
    """A fresh diffusers scheduler for ``name`` ("euler" | "euler_a" | "ddim" | "dpmpp_2m") on SDXL's training
    schedule. ``euler_a`` (ancestral: fresh noise each step, drawn from the sampling seed) forgives a briefly trained
    model's errors that the deterministic samplers carry along (docs/decisions.md, "The tiny recipe")."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)

    if name == "euler":
        return EulerDiscreteScheduler(**SDXL_SCHEDULE_CONFIG, interpolation_type="linear", use_karras_sigmas=False)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**SDXL_SCHEDULE_CONFIG)
    if name == "ddim":
        return DDIMScheduler(**SDXL_SCHEDULE_CONFIG, clip_sample=False, set_alpha_to_one=False)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**SDXL_SCHEDULE_CONFIG, algorithm_type="dpmsolver++", solver_order=2,
                                           solver_type="midpoint", lower_order_final=True, use_karras_sigmas=False)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")


def initial_noise(shape, seed: int) -> torch.Tensor:
    """Standard normal noise from a CPU generator seeded with ``seed`` (float32, CPU)."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _with_time_ids(cond: Conditioning, time_ids: torch.Tensor) -> Conditioning:
    return Conditioning(context=cond.context, pooled=cond.pooled, time_ids=time_ids)


def _denoise(scheduler, denoiser: GuidedDenoiser, latents: torch.Tensor, timesteps, generator) -> torch.Tensor:
    """The sampler loop: scale the input, predict eps with guidance, step."""
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        eps = denoiser(model_input, t)
        latents = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
    return latents


def _set_begin_index(scheduler, index: int) -> None:
    # Euler and DPM-Solver keep a step index; DDIM looks its timestep up directly.
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)


def _cutoff_timestep(fraction: float) -> int:
    """The discrete timestep at which a run split at ``fraction`` of the schedule hands over (diffusers' rule)."""
    return int(round(NUM_TRAIN_TIMESTEPS - fraction * NUM_TRAIN_TIMESTEPS))


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _base_cond_pair(cond, uncond, params: SampleParams):
    check_conditioning(cond, None, "cond")
    batch = cond.context.shape[0]
    cond = _with_time_ids(cond, params.time_ids(batch))
    if uncond is not None:
        check_conditioning(uncond, None, "uncond")
        uncond = _with_time_ids(uncond, params.time_ids(uncond.context.shape[0], negative=True))
    return cond, uncond, batch


def _run_base(unet, cond, uncond, params: SampleParams, latents, denoising_end: float | None):
    cond, uncond, batch = _base_cond_pair(cond, uncond, params)
    shape = (batch, LATENT_CHANNELS, params.height // params.latent_downsample, params.width // params.latent_downsample)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    if latents is None:
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for these params, got {tuple(latents.shape)}")
    device = module_device(unet)
    scheduler = make_scheduler(params.sampler)
    scheduler.set_timesteps(params.steps, device=device)
    timesteps = scheduler.timesteps
    if denoising_end is not None:
        cutoff = _cutoff_timestep(denoising_end)
        timesteps = timesteps[: int((timesteps >= cutoff).sum())]
        if len(timesteps) == 0:
            raise ValueError(f"high_noise_frac={denoising_end} leaves the base model no step at steps={params.steps}")
    _set_begin_index(scheduler, 0)
    latents = latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    denoiser = GuidedDenoiser(unet, cond, uncond, params.guidance_scale)
    return _denoise(scheduler, denoiser, latents, timesteps, generator)


def sample_base(unet, cond: Conditioning, uncond: Conditioning | None, params: SampleParams,
                latents: torch.Tensor | None = None) -> torch.Tensor:
    """Latents [B, 4, H/8, W/8] (float32) from the base UNet; B is ``cond``'s batch size.

    ``latents`` optionally replaces the seeded initial noise (unit variance; scaled by the sampler's initial σ here,
    like diffusers' ``latents=`` argument). ``uncond`` may be ``None`` only for ``guidance_scale == 1``.
    """
    if not isinstance(params, SampleParams):
        raise TypeError(f"params must be a SampleParams, got {type(params).__name__}")
    return _run_base(unet, cond, uncond, params, latents, denoising_end=None)


@dataclass
class RefinerParams:
    """The refiner's run: guidance, sampler, seed and micro-conditioning (``negative_*`` None = the positive value;
    ``original_size`` None = the latents' size in pixels)."""

    steps: int = 50
    guidance_scale: float = 5.0
    sampler: str = "euler"
    seed: int = 0
    original_size: tuple[int, int] | None = None
    crop_coords: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    negative_original_size: tuple[int, int] | None = None
    negative_crop_coords: tuple[int, int] | None = None
    latent_downsample: int = LATENT_DOWNSAMPLE  # pixels per latent (for the default original_size)

    def __post_init__(self):
        _check_run_fields(self)
        self.latent_downsample = _check_int(self.latent_downsample, "latent_downsample", 1)
        for name in ("original_size", "negative_original_size"):
            if getattr(self, name) is not None:
                setattr(self, name, _check_pair(getattr(self, name), name, 1))
        self.negative_crop_coords = _check_pair(self.negative_crop_coords or self.crop_coords,
                                                "negative_crop_coords", 0)
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    def cond_pair(self, cond, uncond, latents: torch.Tensor):
        size = self.original_size or (latents.shape[-2] * self.latent_downsample,
                                      latents.shape[-1] * self.latent_downsample)
        check_conditioning(cond, latents.shape[0], "refiner cond")
        cond = _with_time_ids(cond, refiner_time_ids(size, self.crop_coords, self.aesthetic_score, latents.shape[0]))
        if uncond is not None:
            check_conditioning(uncond, None, "refiner uncond")
            ids = refiner_time_ids(self.negative_original_size or size, self.negative_crop_coords,
                                   self.negative_aesthetic_score, uncond.context.shape[0])
            uncond = _with_time_ids(uncond, ids)
        return cond, uncond


def _check_latents(latents) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"latents must be a [B, {LATENT_CHANNELS}, h, w] tensor, got "
                         f"{getattr(latents, 'shape', type(latents))}")
    return latents


def sdedit_start(steps: int, strength: float) -> tuple[int, int]:
    """(index of the first step run, number of steps run) for an SDEdit pass of ``strength`` (diffusers' rule)."""
    run = min(int(steps * strength), steps)
    return max(steps - run, 0), run


def refine_sdedit(refiner_unet, latents: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                  strength: float = 0.3, steps: int = 50, *, max_refiner_timestep: int = REFINER_T_RANGE[1],
                  **options) -> torch.Tensor:
    """Noise base ``latents`` to the level ``strength`` selects and denoise them with the refiner.

    As in diffusers' Img2Img pipeline, the sampler is set up for ``steps`` steps and only the last
    ``int(steps·strength)`` run; the latents are noised (seeded from ``seed``) to the first of those. The
    refiner was trained on timesteps below ``max_refiner_timestep`` (200); a start above it is allowed (diffusers'
    default strength 0.3 starts at t=281 with 50 "leading" steps) but warned about. ``original_size`` defaults to
    the latents' size in pixels. ``options`` are :class:`RefinerParams` fields (guidance_scale, sampler, seed,
    original_size, crop_coords, aesthetic_score, negative_aesthetic_score, negative_original_size,
    negative_crop_coords).
    """
    params = RefinerParams(steps=steps, **options)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    latents = _check_latents(latents)
    first, run = sdedit_start(steps, strength)
    if run == 0:
        raise ValueError(f"strength={strength} with steps={steps} runs no refiner step (needs strength*steps >= 1)")
    cond, uncond = params.cond_pair(cond, uncond, latents)
    device = module_device(refiner_unet)
    scheduler = make_scheduler(params.sampler)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps[first * scheduler.order:]
    _set_begin_index(scheduler, first * scheduler.order)
    if int(timesteps[0]) >= max_refiner_timestep:
        warnings.warn(f"refiner starts at timestep {int(timesteps[0])}, beyond the {max_refiner_timestep} levels "
                      f"it was trained on (strength={strength}, steps={steps})", stacklevel=2)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    noise = torch.randn(tuple(latents.shape), generator=generator, dtype=torch.float32).to(device)
    start = timesteps[:1].repeat(latents.shape[0])
    noisy = scheduler.add_noise(latents.to(device=device, dtype=torch.float32), noise, start)
    denoiser = GuidedDenoiser(refiner_unet, cond, uncond, params.guidance_scale)
    return _denoise(scheduler, denoiser, noisy, timesteps, generator)


def ensemble_of_experts(base_unet, refiner_unet, base_cond: Conditioning, base_uncond: Conditioning | None,
                        refiner_cond: Conditioning, refiner_uncond: Conditioning | None, params: SampleParams,
                        high_noise_frac: float = 0.8, aesthetic_score: float = 6.0,
                        negative_aesthetic_score: float = 2.5, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Base denoises timesteps >= the hand-over point, the refiner the rest, both on one ``params.steps`` schedule.

    The hand-over timestep is ``round(1000·(1 − high_noise_frac))`` (0.8 → 200, the refiner's trained range).
    The refiner uses the base's original_size / crop_coords (and negatives) and the given aesthetic scores.
    """
    if not isinstance(params, SampleParams):
        raise TypeError(f"params must be a SampleParams, got {type(params).__name__}")
    high_noise_frac = _check_fraction(high_noise_frac, "high_noise_frac")
    refiner = RefinerParams(steps=params.steps, guidance_scale=params.guidance_scale, sampler=params.sampler,
                            seed=params.seed, original_size=params.original_size, crop_coords=params.crop_coords,
                            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                            negative_original_size=params.negative_original_size,
                            negative_crop_coords=params.negative_crop_coords,
                            latent_downsample=params.latent_downsample)
    handover = _run_base(base_unet, base_cond, base_uncond, params, latents, denoising_end=high_noise_frac)
    cond, uncond = refiner.cond_pair(refiner_cond, refiner_uncond, handover)
    device = module_device(refiner_unet)
    scheduler = make_scheduler(params.sampler)
    scheduler.set_timesteps(params.steps, device=device)
    run = int((scheduler.timesteps < _cutoff_timestep(high_noise_frac)).sum())
    if scheduler.order == 2 and run % 2 == 0:
        run += 1  # never split a second-order step between its two evaluations
    if run == 0:
        raise ValueError(f"high_noise_frac={high_noise_frac} leaves the refiner no step at steps={params.steps}")
    first = len(scheduler.timesteps) - run
    _set_begin_index(scheduler, first)
    denoiser = GuidedDenoiser(refiner_unet, cond, uncond, params.guidance_scale)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    return _denoise(scheduler, denoiser, handover.to(device), scheduler.timesteps[first:], generator)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Images [B, 3, d·h, d·w] in [0, 1] (float32) from scaled latents (d: the VAE's pixels per latent), decoding
    in float32. ``scale``: the latent
    scale factor; None = the VAE's own ``config.scaling_factor`` (sdxl/latent_scale.py).

    SDXL's VAE overflows in fp16 (NaN / black images), so a half-precision VAE is upcast for the call and restored
    afterwards; a NaN left after that raises instead of returning a black image.
    """
    latents = _check_latents(latents)
    scale = vae_scaling_factor(vae) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or Inf; the sampler diverged before decoding")
    original_dtype = next(vae.parameters()).dtype
    device = module_device(vae)
    try:
        if original_dtype != torch.float32:
            vae.to(torch.float32)
        with torch.autocast(device.type, enabled=False):
            images = vae.decode(latents.to(device=device, dtype=torch.float32) / scale, return_dict=False)[0]
    finally:
        if original_dtype != torch.float32:
            vae.to(original_dtype)
    if not torch.isfinite(images).all():
        raise FloatingPointError("VAE decode produced NaN/Inf even in float32; check the VAE weights")
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] images in [0, 1] → PIL RGB images."""
    from PIL import Image

    array = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]
