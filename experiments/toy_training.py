"""In-process training and sampling of toy SDXL UNets on the demo data, for ``experiments/paper_effects.py``.

The pieces are the project's own: diffusers ``UNet2DConditionModel`` built from the ``tiny`` preset's base / refiner
configs, the eps loss :func:`sdxl.diffusion.diffusion_loss`, Alg. 1 crops from :mod:`sdxl.crops`, the micro-
conditioning ``time_ids`` of :mod:`sdxl.conditioner` (Fourier-embedded inside the UNet), CFG text dropout
(:func:`sdxl.conditioner.drop_text_conditioning`), the tiny random-weight CLIP text encoders on the demo captions, and
the project's schedulers / guidance for sampling. They run in a plain single-process loop: Ray Train's start-up and
checkpointing would eat most of the 30-minute CPU budget, and nothing here needs more than one process.

Two toy-scale departures, both because of that budget:
- Pixel space instead of VAE latents. A random-weight VAE would scramble the images and training one would take the
  whole budget, so the "autoencoder" is fixed and exactly invertible: space-to-depth by 2 (32×32 RGB ↔ 12×16×16).
  The UNets therefore take 12 channels; everything else about them is the tiny preset, with one ResNet per level.
- Sizes are the demo data's divided by :data:`TOY_SCALE` (8), so the demo's 256-px "small image" threshold becomes
  the 32-px training size: a "small" original really is upscaled (blurry) when it is brought to 32 px.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from sdxl.conditioner import (Conditioning, TextConditioner, TextEmbeddings, base_time_ids, drop_text_conditioning,
                              refiner_time_ids)
from sdxl.crops import random_crop_resize
from sdxl.diffusion import diffusion_loss
from sdxl.guidance import GuidedDenoiser
from sdxl.models import build_text_encoders
from sdxl.presets import get_preset
from sdxl.sampling import initial_noise, make_scheduler, sdedit_start
from sdxl.tokenizers import load_tokenizers
from stages.data.demo_data import caption_for, render, sample_params

TOY_SCALE = 8
RESOLUTION = 32
SPACE_TO_DEPTH = 2
LATENT_CHANNELS = 3 * SPACE_TO_DEPTH ** 2
LATENT_RES = RESOLUTION // SPACE_TO_DEPTH
# Like the VAE's scale factor (0.13025): brings the "latents" to about unit variance (the 32-px training crops of the
# demo data have std 0.62 in [-1, 1]), the signal level SDXL's noise schedule was designed for.
LATENT_SCALE = 1.6
TEXT_BATCH = 128


# ------------------------------------------------------------------------------------------------------------ data
@dataclass
class ToyImage:
    pixels: torch.Tensor  # [3, H, W] float in [-1, 1] at the image's own (toy) size
    caption: str
    params: dict  # the demo generator's parameters, orig_h / orig_w at toy scale

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


def make_toy_dataset(n: int, seed: int, scale: int = TOY_SCALE) -> list[ToyImage]:
    """``n`` demo images (same generator, same parameters as stages/data/demo_data.py) rendered at 1/``scale`` of
    their demo size, in memory. Small originals are still rendered ``render_scale``× larger and downscaled."""
    if n < 1 or scale < 1:
        raise ValueError(f"n and scale must be >= 1, got n={n}, scale={scale}")
    images = []
    for index in range(n):
        params = sample_params(np.random.default_rng([seed, index]), index, seed)
        params["orig_h"] = max(4, int(round(params["orig_h"] / scale)))
        params["orig_w"] = max(4, int(round(params["orig_w"] / scale)))
        array = np.asarray(render(params), dtype=np.float32)
        pixels = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
        images.append(ToyImage(pixels=pixels.contiguous(), caption=caption_for(params), params=params))
    return images


def aesthetic_proxy(original_size: tuple[int, int], resolution: int = RESOLUTION) -> float:
    """A stand-in aesthetic score (no predictor exists offline): 4.5 + 1.5·log2(shorter side / resolution), in
    [1, 9]. 64-px originals score 6.0 (the paper's sampling value), ~20-px (blurry when upscaled) ones 2.5."""
    short = min(original_size)
    return float(min(9.0, max(1.0, 4.5 + 1.5 * math.log2(short / resolution))))


# ------------------------------------------------------------------------------------------------- "autoencoder"
def pixels_to_latents(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, 32, 32] in [-1, 1] → [B, 12, 16, 16] (space-to-depth, scaled; exactly invertible)."""
    return F.pixel_unshuffle(pixels, SPACE_TO_DEPTH) * LATENT_SCALE


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """[B, 12, 16, 16] → images [B, 3, 32, 32] in [0, 1]."""
    return (F.pixel_shuffle(latents.float() / LATENT_SCALE, SPACE_TO_DEPTH) / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------------------------ models
def toy_unet_config(kind: str) -> dict:
    """The tiny preset's base / refiner UNet on 12×16×16 pixel "latents", one ResNet per level (CPU budget)."""
    config = dict(get_preset("tiny").unet_config(kind))
    config.update(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, sample_size=LATENT_RES,
                  layers_per_block=1)
    return config


def build_toy_unet(kind: str, seed: int) -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**toy_unet_config(kind))


class ToyText:
    """The tiny random-weight CLIP-L / bigG encoders (frozen, fixed seed) with a cache: captions are encoded once."""

    def __init__(self, seed: int = 0):
        text_l, text_g = build_text_encoders("tiny", seed=seed)
        tok_l, tok_g = load_tokenizers(None, None)
        # The empty prompt's encoding (not zeros) is the unconditional input, as in training's CFG dropout.
        self.conditioner = TextConditioner(tok_l, text_l.eval(), tok_g, text_g.eval(), kind="base",
                                           force_zeros_for_empty_prompt=False)
        self._cache: dict[str, TextEmbeddings] = {}

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        missing = sorted({p for p in prompts if p not in self._cache})
        for start in range(0, len(missing), TEXT_BATCH):
            chunk = missing[start:start + TEXT_BATCH]
            emb = self.conditioner.encode_text(chunk)
            for i, prompt in enumerate(chunk):
                self._cache[prompt] = emb.slice(i, i + 1)
        parts = [self._cache[p] for p in prompts]
        return TextEmbeddings(context_g=torch.cat([e.context_g for e in parts]),
                              pooled_g=torch.cat([e.pooled_g for e in parts]),
                              context_l=torch.cat([e.context_l for e in parts]))


def _for_kind(text: TextEmbeddings, kind: str) -> TextEmbeddings:
    """The refiner sees bigG only (context and pooled); the base CLIP-L ‖ bigG."""
    return text if kind == "base" else TextEmbeddings(context_g=text.context_g, pooled_g=text.pooled_g)


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainSpec:
    name: str
    steps: int
    kind: str = "base"  # "base" or "refiner"
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    size_conditioning: bool = True  # False: c_size = the target for every image (the "unconditioned" model)
    min_original_side: int = 0  # > 0: train only on originals whose shorter side is at least this
    t_range: tuple[int, int] = (0, 1000)
    ucg_rate: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    snapshot_steps: tuple[int, ...] = ()  # also keep the EMA weights after these steps


@dataclass
class TrainResult:
    spec: TrainSpec
    model: UNet2DConditionModel  # EMA weights, eval mode
    pool_size: int  # images the spec allowed
    seen_images: int  # distinct images drawn over the run
    seconds: float
    loss_curve: list[float]  # mean loss per 10% of the run
    snapshots: dict[int, tuple[UNet2DConditionModel, int]] = field(default_factory=dict)  # step → (EMA, seen)


def training_pool(images: list[ToyImage], spec: TrainSpec) -> list[int]:
    pool = [i for i, img in enumerate(images) if min(img.size) >= spec.min_original_side]
    if not pool:
        raise ValueError(f"{spec.name}: no image has a shorter side >= min_original_side={spec.min_original_side}")
    return pool


def make_batch(images: list[ToyImage], indices: list[int], spec: TrainSpec, text: ToyText,
               generator: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
    """Alg. 1 crops (random offsets from ``generator``) + micro-conditioning + text with CFG dropout."""
    crops, sizes, offsets = [], [], []
    for i in indices:
        pixels, info = random_crop_resize(images[i].pixels, RESOLUTION, rng=generator)
        crops.append(pixels.clamp(-1, 1))
        sizes.append(info.c_size if spec.size_conditioning else info.c_target)
        offsets.append(info.c_crop)
    batch = len(indices)
    if spec.kind == "base":
        time_ids = base_time_ids(torch.tensor(sizes), torch.tensor(offsets), (RESOLUTION, RESOLUTION), batch)
    else:
        scores = torch.tensor([aesthetic_proxy(images[i].size) for i in indices])
        time_ids = refiner_time_ids(torch.tensor(sizes), torch.tensor(offsets), scores, batch)
    emb = _for_kind(text.encode([images[i].caption for i in indices]), spec.kind)
    empty = _for_kind(text.encode([""]), spec.kind)
    emb = drop_text_conditioning(emb, empty, spec.ucg_rate, generator)
    cond = Conditioning(context=emb.context, pooled=emb.pooled_g, time_ids=time_ids)
    return pixels_to_latents(torch.stack(crops)), cond


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train_toy(images: list[ToyImage], spec: TrainSpec, text: ToyText, log=print) -> TrainResult:
    """AdamW (linear warm-up, then constant lr), gradient clipping 1.0, EMA; fully determined by ``spec.seed``."""
    if spec.kind not in ("base", "refiner"):
        raise ValueError(f"TrainSpec.kind must be 'base' or 'refiner', got {spec.kind!r}")
    if spec.steps < 1 or spec.batch_size < 1:
        raise ValueError(f"{spec.name}: steps and batch_size must be >= 1, got {spec.steps}, {spec.batch_size}")
    pool = training_pool(images, spec)
    model = build_toy_unet(spec.kind, spec.seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, spec.warmup_steps)))
    generator = torch.Generator().manual_seed(spec.seed)
    seen: set[int] = set()
    losses: list[float] = []
    snapshots: dict[int, tuple[UNet2DConditionModel, int]] = {}
    start = time.perf_counter()
    for step in range(1, spec.steps + 1):
        picks = torch.randint(0, len(pool), (spec.batch_size,), generator=generator).tolist()
        indices = [pool[p] for p in picks]
        seen.update(indices)
        latents, cond = make_batch(images, indices, spec, text, generator)
        loss, _ = diffusion_loss(model, latents, cond, t_range=spec.t_range, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        # EMA warm-up (as in many diffusion codebases): early weights are averaged less.
        _ema_update(ema, model, min(spec.ema_decay, (1 + step) / (10 + step)))
        losses.append(float(loss.detach()))
        if step in spec.snapshot_steps:
            snapshots[step] = (copy.deepcopy(ema), len(seen))
        if step % max(1, spec.steps // 5) == 0 or step == spec.steps:
            log(f"[{spec.name}] step {step}/{spec.steps} loss {np.mean(losses[-50:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    tenth = max(1, len(losses) // 10)
    curve = [float(np.mean(losses[i:i + tenth])) for i in range(0, len(losses), tenth)]
    return TrainResult(spec=spec, model=ema, pool_size=len(pool), seen_images=len(seen),
                       seconds=time.perf_counter() - start, loss_curve=curve, snapshots=snapshots)


# ---------------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SampleSpec:
    """DDIM with eta = 1 (ancestral, DDPM-like): at toy training lengths the deterministic eta = 0 path drifts into
    grainy noise (measured: HF energy 0.48 vs 0.26 and visibly noise-like samples at 1000 steps), while the fresh
    noise of each ancestral step corrects the model's errors."""

    steps: int = 20
    guidance_scale: float = 3.0
    eta: float = 1.0
    noise_seed: int = 0  # the per-step noise; the same batch layout gets the same noise in every setting


def _noise(seeds: list[int]) -> torch.Tensor:
    return torch.cat([initial_noise((1, LATENT_CHANNELS, LATENT_RES, LATENT_RES), s) for s in seeds])


def _denoise(unet, cond: Conditioning, uncond: Conditioning, latents, timesteps, scheduler, spec: SampleSpec):
    denoiser = GuidedDenoiser(unet, cond, uncond, spec.guidance_scale)
    generator = torch.Generator().manual_seed(spec.noise_seed)
    for t in timesteps:
        eps = denoiser(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, eta=spec.eta, generator=generator, return_dict=False)[0]
    return latents


def base_conditioning(text: ToyText, prompts: list[str], original_size, crop_coords) -> tuple[Conditioning, ...]:
    """(cond, uncond) for the base; the unconditional branch keeps the micro-conditioning (sgm / diffusers)."""
    ids = base_time_ids(original_size, crop_coords, (RESOLUTION, RESOLUTION), len(prompts))
    emb, empty = text.encode(prompts), text.encode([""] * len(prompts))
    return (Conditioning(context=emb.context, pooled=emb.pooled_g, time_ids=ids),
            Conditioning(context=empty.context, pooled=empty.pooled_g, time_ids=ids))


@torch.no_grad()
def sample_base_toy(unet, text: ToyText, prompts: list[str], seeds: list[int], original_size, crop_coords,
                    spec: SampleSpec = SampleSpec()) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [0, 1]; one seed per prompt (same seed → same initial noise in every setting)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
    cond, uncond = base_conditioning(text, prompts, original_size, crop_coords)
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(spec.steps)
    latents = _noise(seeds) * scheduler.init_noise_sigma
    return latents_to_images(_denoise(unet, cond, uncond, latents, scheduler.timesteps, scheduler, spec))


@torch.no_grad()
def refine_toy(refiner, text: ToyText, images: torch.Tensor, prompts: list[str], seeds: list[int],
               strength: float = 0.2, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
               spec: SampleSpec = SampleSpec()) -> tuple[torch.Tensor, int]:
    """SDEdit with the refiner (Sec. 2.5): noise the base images to the step ``strength`` selects and denoise.
    Returns (images in [0, 1], first timestep run) — the start must lie inside the refiner's 200 levels."""
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(spec.steps)
    first, run = sdedit_start(spec.steps, strength)
    if run == 0:
        raise ValueError(f"strength={strength} with steps={spec.steps} runs no refiner step")
    timesteps = scheduler.timesteps[first:]
    batch = len(prompts)
    size = (RESOLUTION * 2, RESOLUTION * 2)  # what the aesthetic proxy calls a 6.0-quality original
    emb, empty = (_for_kind(text.encode(p), "refiner") for p in (prompts, [""] * batch))
    cond = Conditioning(context=emb.context, pooled=emb.pooled_g,
                        time_ids=refiner_time_ids(size, (0, 0), aesthetic_score, batch))
    uncond = Conditioning(context=empty.context, pooled=empty.pooled_g,
                          time_ids=refiner_time_ids(size, (0, 0), negative_aesthetic_score, batch))
    latents = pixels_to_latents(images * 2 - 1)
    noisy = scheduler.add_noise(latents, _noise([s + 10_000 for s in seeds]), timesteps[:1].repeat(batch))
    return (latents_to_images(_denoise(refiner, cond, uncond, noisy, timesteps, scheduler, spec)),
            int(timesteps[0]))
