"""The latent scale factor: measured as 1 / std of the latents, read from the VAE's config everywhere."""

from __future__ import annotations

import pytest
import torch

from sdxl.latent_scale import DEFAULT_SCALING_FACTOR, measure_scaling_factor, vae_scaling_factor
from sdxl.models import build_vae
from sdxl.sampling import decode_latents


def test_measured_factor_makes_latents_unit_variance():
    vae = build_vae("tiny", seed=3).eval()
    pixels = torch.rand(24, 3, 32, 32) * 2 - 1
    factor = measure_scaling_factor(vae, pixels)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * factor
    assert latents.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)
    assert measure_scaling_factor(vae, pixels, target_std=0.5) == pytest.approx(factor / 2)


def test_factor_is_read_from_the_config_and_used_by_decode():
    vae = build_vae("tiny", seed=1).eval()
    assert vae_scaling_factor(vae) == DEFAULT_SCALING_FACTOR
    vae.register_to_config(scaling_factor=0.5)
    assert vae_scaling_factor(vae) == 0.5
    latents = torch.randn(2, 4, 4, 4)
    assert torch.equal(decode_latents(vae, latents), decode_latents(vae, latents, 0.5))
    assert not torch.equal(decode_latents(vae, latents), decode_latents(vae, latents, DEFAULT_SCALING_FACTOR))


def test_bad_inputs_are_refused():
    vae = build_vae("tiny").eval()
    with pytest.raises(ValueError, match="at least 2"):
        measure_scaling_factor(vae, torch.zeros(1, 3, 32, 32))
    vae.register_to_config(scaling_factor=-1.0)
    with pytest.raises(ValueError, match="scaling_factor"):
        vae_scaling_factor(vae)
