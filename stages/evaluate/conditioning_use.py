"""Conditioning use: how much worse a base model denoises held-out demo images when its prompt names a wrong
background, object colour, position or shape.

Reading samples (prompt_following.py) says whether a model *draws* what it is asked; it stays at chance until an
attribute is learnt well enough to survive sampling. This measure says whether the model *uses* each word at all, and
is far more sensitive: held-out demo images are encoded by the model's own VAE and noised at a few fixed levels, then
denoised once with their true caption and once with the same caption where one attribute is replaced by another value
of the vocabulary (same noise, same micro-conditioning). The x0 error (SDXL's eps prediction turned into the clean
latent) rises with the wrong word exactly as much as the model relies on it:

    gain(attribute) = (mean x0-MSE with the wrong word - mean x0-MSE with the true caption) / mean x0-MSE (true)

0 means the model ignores the word; a model that ignores text altogether scores 0 on all four. ``z`` is the paired
difference's mean over its standard error across images (> ~3: the gain is not noise). Pure functions on tensors; the
evaluate stage supplies the UNet, the text encoding and the latents (``heldout_latents``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from stages.evaluate.prompt_following import COLS, ROWS, PromptSpec

ATTRIBUTES = ("background", "object_color", "position", "shape")
DEFAULT_TIMESTEPS = (300, 500, 700, 900)  # where layout and colour are decided; low-noise steps add only detail
Encode = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # prompts → (context [B, 77, C], pooled [B, P])


def _vocabulary(attribute: str) -> list:
    from stages.data.demo_data import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES

    if attribute == "background":
        return list(BACKGROUND_COLORS)
    if attribute == "object_color":
        return list(OBJECT_COLORS)
    if attribute == "position":
        return [(row, col) for row in ROWS for col in COLS]
    if attribute == "shape":
        return list(SHAPES)
    raise ValueError(f"attribute must be one of {list(ATTRIBUTES)}, got {attribute!r}")


def _value(spec: PromptSpec, attribute: str):
    return {"background": spec.background, "object_color": spec.color, "position": (spec.row, spec.col),
            "shape": spec.shape}[attribute]


def swapped(spec: PromptSpec, attribute: str, rng: np.random.Generator) -> PromptSpec:
    """``spec`` with ``attribute`` replaced by a different value of the vocabulary, drawn uniformly from ``rng``."""
    others = [v for v in _vocabulary(attribute) if v != _value(spec, attribute)]
    value = others[int(rng.integers(len(others)))]
    if attribute == "background":
        return dataclasses.replace(spec, background=value)
    if attribute == "object_color":
        return dataclasses.replace(spec, color=value)
    if attribute == "shape":
        return dataclasses.replace(spec, shape=value)
    return dataclasses.replace(spec, row=value[0], col=value[1])


def x0_errors(unet, latents: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor,
               timesteps: Sequence[int], noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """[len(timesteps), B] per-image x0-MSE of one batch, one UNet call per timestep."""
    dtype = next(unet.parameters()).dtype
    device = latents.device
    rows = []
    for index, t in enumerate(timesteps):
        a = alphas_cumprod[t].to(device)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise[index]
        t_batch = torch.full((latents.shape[0],), int(t), device=device, dtype=torch.long)
        eps = unet(noisy.to(dtype), t_batch, encoder_hidden_states=context.to(dtype),
                   added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
                   return_dict=False)[0].float()
        x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        rows.append(((x0 - latents) ** 2).mean(dim=(1, 2, 3)))
    return torch.stack(rows)


@torch.no_grad()
def conditioning_use(unet, encode: Encode, latents: torch.Tensor, specs: Sequence[PromptSpec],
                     time_ids: torch.Tensor, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
                     batch_size: int = 32) -> dict:
    """Gain and z per attribute (module doc) over the images ``latents`` [N, 4, h, w] (scaled VAE latents) whose
    captions are ``specs``; ``time_ids`` [N, 6] their micro-conditioning."""
    from sdxl.diffusion import default_schedule

    n = len(specs)
    if n < 2 or latents.shape[0] != n or time_ids.shape[0] != n:
        raise ValueError(f"need >= 2 images with one spec and one time-id row each, got {latents.shape[0]} latents, "
                         f"{n} specs, {time_ids.shape[0]} time-id rows")
    timesteps = [int(t) for t in timesteps]
    schedule = default_schedule()
    if not timesteps or min(timesteps) < 0 or max(timesteps) >= schedule.num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps}), got {timesteps}")
    rng = np.random.default_rng(seed)
    variants = {"true": list(specs)}
    for attribute in ATTRIBUTES:
        variants[attribute] = [swapped(spec, attribute, rng) for spec in specs]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(timesteps), *latents.shape), generator=generator).to(latents.device)
    errors = {name: [] for name in variants}
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        for name, variant in variants.items():
            context, pooled = encode([spec.prompt for spec in variant[part]])
            errors[name].append(x0_errors(unet, latents[part], context.to(latents.device),
                                           pooled.to(latents.device), time_ids[part].to(latents.device), timesteps,
                                           noise[:, part], schedule.alphas_cumprod))
    per_image = {name: torch.cat(rows, dim=1) for name, rows in errors.items()}  # [T, N]
    true = per_image["true"]
    base = float(true.mean())
    out = {"timesteps": timesteps, "num_images": n, "x0_mse_true": base}
    for attribute in ATTRIBUTES:
        rise = per_image[attribute] - true  # [T, N]
        diff = rise.mean(dim=0)  # per image, over timesteps
        spread = float(diff.std()) / math.sqrt(n)
        per_step = rise.mean(dim=1) / true.mean(dim=1).clamp_min(1e-12)
        out[attribute] = {
            "gain": float(diff.mean()) / base if base > 0 else 0.0,
            "z": float(diff.mean()) / spread if spread > 0 else 0.0,
            "gain_per_timestep": {t: float(g) for t, g in zip(timesteps, per_step)},
        }
    return out

