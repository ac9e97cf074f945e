"""The VAE latent scale factor: what the diffusion models multiply posterior samples by.

LDM (Rombach et al., Sec. 3.3 / App. G) rescales latents so that they have unit standard deviation before diffusion,
with one factor measured on the data once the autoencoder is trained: 1 / std(latents). SDXL's public VAE says 0.13025
(its latents have std ≈ 7.7). A VAE this project trains gets its own factor, measured at the end of ``train_vae`` and
stored in the VAE's ``config.json`` (``scaling_factor``), the field diffusers' pipelines read; every consumer
(training, sampling, evaluation, serving, export) takes the factor from the VAE it uses, never from a constant.
"""

from __future__ import annotations

import math

import torch

from sdxl.presets import SDXL_VAE_SCALE_FACTOR as DEFAULT_SCALING_FACTOR  # SDXL's public VAE


def vae_downsample(vae) -> int:
    """Pixels per latent along a side: 2 per level of the VAE after the first (SDXL's: 8; the tiny preset's: 4)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_scaling_factor(vae) -> float:
    """The factor recorded in ``vae.config.scaling_factor`` (SDXL's 0.13025 when the config lacks it)."""
    config = getattr(vae, "config", None)
    value = getattr(config, "scaling_factor", None) if config is not None else None
    if value is None and isinstance(config, dict):
        value = config.get("scaling_factor")
    value = DEFAULT_SCALING_FACTOR if value is None else float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the VAE's config.scaling_factor must be a positive number, got {value!r}")
    return value


@torch.no_grad()
def measure_scaling_factor(vae, pixels: torch.Tensor, target_std: float = 1.0) -> float:
    """``target_std / std`` of the posterior means of ``pixels`` ([B, 3, H, W] in [-1, 1]), batch by batch.

    ``target_std`` 1 is LDM's rule (unit-variance latents)."""
    if pixels.ndim != 4 or pixels.shape[0] < 2:
        raise ValueError(f"need a batch of at least 2 images [B, 3, H, W], got {tuple(pixels.shape)}")
    if not target_std > 0:
        raise ValueError(f"target_std must be > 0, got {target_std}")
    device = next(vae.parameters()).device
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, pixels.shape[0], 16):
        latents = vae.encode(pixels[start:start + 16].to(device, torch.float32)).latent_dist.mean.double()
        total += float(latents.sum())
        total_sq += float((latents * latents).sum())
        count += latents.numel()
    variance = total_sq / count - (total / count) ** 2
    if not variance > 0:
        raise ValueError("the VAE maps every image to the same latent; cannot measure a scale factor")
    return float(target_std / math.sqrt(variance))
