"""Sampling parameters, guidance, determinism, the refiner modes' rules and float32 decoding."""

from __future__ import annotations

import pytest
import torch

from sdxl.conditioner import Conditioning
from sdxl.guidance import (GuidedDenoiser, combine_guidance, guidance_scale_to_sgm_weight,
                           sgm_weight_to_guidance_scale)
from sdxl.models import build_vae
from sdxl.presets import get_preset
from sdxl.sampling import (SAMPLERS, RefinerParams, SampleParams, decode_latents, ensemble_of_experts, initial_noise,
                           make_scheduler, refine_sdedit, sample_base, sdedit_start, to_pil)

PRESET = get_preset("tiny")


@pytest.fixture(scope="module")
def unet(tiny_components):
    return tiny_components.unet


@pytest.fixture(scope="module")
def refiner(tiny_components):
    return tiny_components.refiner_unet


def _pair(batch=1, dim=PRESET.context_dim_base, n_ids=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: Conditioning(torch.randn(batch, 77, dim, generator=g),  # noqa: E731
                                torch.randn(batch, PRESET.pooled_dim, generator=g), torch.zeros(batch, n_ids))
    return make(), make()


class CountingUNet(torch.nn.Module):
    """Wraps a UNet and records the batch size of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches, self.time_ids = inner, [], []

    def forward(self, x, t, **kwargs):
        self.batches.append(x.shape[0])
        self.time_ids.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return self.inner(x, t, **kwargs)


# ---- parameters ------------------------------------------------------------------------------------------------

def test_sample_params_defaults_follow_the_requested_size():
    params = SampleParams(height=64, width=128)
    assert params.original_size == (64, 128) and params.target_size == (64, 128) and params.crop_coords == (0, 0)
    assert params.negative_original_size == (64, 128) and params.negative_crop_coords == (0, 0)
    assert params.time_ids(2).tolist() == [[64, 128, 0, 0, 64, 128]] * 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(height=60), "height must be a multiple of 8"), (dict(width=0), "width must be a multiple of 8"),
    (dict(height="64"), "height must be an integer"),
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"), (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(sampler="heun"), "sampler"), (dict(seed=-1), "seed"), (dict(seed=True), "seed"),
    (dict(original_size=(0, 64)), "original_size"), (dict(target_size=(64,)), "target_size"),
    (dict(crop_coords=(-8, 0)), "crop_coords"), (dict(negative_crop_coords=(1.5, 0)), "negative_crop_coords"),
])
def test_sample_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SampleParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(aesthetic_score=float("inf")), "aesthetic_score"), (dict(negative_aesthetic_score="low"),
                                                               "negative_aesthetic_score"),
    (dict(sampler="lms"), "sampler"), (dict(original_size=(64, -1)), "original_size"),
])
def test_refiner_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RefinerParams(**kwargs)


def test_make_scheduler_uses_the_training_schedule():
    for name in SAMPLERS:
        scheduler = make_scheduler(name)
        assert scheduler.config.num_train_timesteps == 1000
        assert scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.config.prediction_type == "epsilon"
        scheduler.set_timesteps(50)
        timesteps = [int(t) for t in scheduler.timesteps]
        assert len(timesteps) == 50 and timesteps == sorted(timesteps, reverse=True)
        # "leading" spacing with offset 1; diffusers' DPM-Solver spaces by 1000 // (steps + 1) instead of // steps.
        assert (timesteps[0], timesteps[-1]) == ((951, 20) if name == "dpmpp_2m" else (981, 1))
    assert make_scheduler("dpmpp_2m").config.algorithm_type == "dpmsolver++"
    assert make_scheduler("dpmpp_2m").config.solver_order == 2
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_scheduler("plms")


# ---- guidance --------------------------------------------------------------------------------------------------

def test_guidance_conventions_agree():
    eps_u, eps_c = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    w = 4.0  # the paper's / sgm's weight
    sgm = (1 + w) * eps_c - w * eps_u
    assert torch.allclose(combine_guidance(eps_u, eps_c, sgm_weight_to_guidance_scale(w)), sgm, atol=1e-6)
    assert guidance_scale_to_sgm_weight(sgm_weight_to_guidance_scale(w)) == w


def test_guided_denoiser_batches_cond_and_uncond_in_one_call(unet):
    cond, uncond = _pair()
    counting = CountingUNet(unet)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    guided = GuidedDenoiser(counting, cond, uncond, 5.0)(x, t)
    assert counting.batches == [2]
    with torch.no_grad():
        eps_c = unet(x, t, **cond.unet_kwargs()).sample
        eps_u = unet(x, t, **uncond.unet_kwargs()).sample
    assert torch.allclose(guided, eps_u + 5.0 * (eps_c - eps_u), atol=1e-5)
    # Scale 1 is the conditional model alone, in a single un-doubled pass; scale 0 the unconditional one.
    assert torch.allclose(GuidedDenoiser(counting, cond, None, 1.0)(x, t), eps_c, atol=1e-5)
    assert torch.allclose(GuidedDenoiser(counting, cond, uncond, 0.0)(x, t), eps_u, atol=1e-5)
    assert counting.batches[1:] == [1, 1]


def test_guided_denoiser_errors(unet):
    cond, uncond = _pair(batch=2)
    with pytest.raises(ValueError, match="uncond is required"):
        GuidedDenoiser(unet, cond, None, 5.0)
    with pytest.raises(ValueError, match="uncond has batch size 3, expected 2"):
        GuidedDenoiser(unet, cond, _pair(batch=3)[1], 5.0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        GuidedDenoiser(unet, cond, uncond, -2.0)
    with pytest.raises(ValueError, match="latents have batch 1, conditioning has 2"):
        GuidedDenoiser(unet, cond, uncond, 5.0)(torch.randn(1, 4, 8, 8), torch.tensor(10))


# ---- base sampling ---------------------------------------------------------------------------------------------

def test_sample_base_is_deterministic_per_seed_and_uses_params_time_ids(unet):
    cond, uncond = _pair()
    counting = CountingUNet(unet)
    params = SampleParams(height=64, width=64, steps=3, seed=4, original_size=(128, 96), crop_coords=(16, 0),
                          negative_original_size=(32, 32))
    first = sample_base(counting, cond, uncond, params)
    assert torch.equal(first, sample_base(unet, cond, uncond, params))
    other = sample_base(unet, cond, uncond, SampleParams(height=64, width=64, steps=3, seed=5))
    assert not torch.allclose(first, other)
    # [uncond, cond]; the negative crop defaults to the positive one.
    assert counting.time_ids[0].tolist() == [[32, 32, 16, 0, 64, 64], [128, 96, 16, 0, 64, 64]]
    # The seed's noise is exactly the CPU generator's draw (what serve and diffusers use).
    explicit = sample_base(unet, cond, uncond, params, latents=initial_noise((1, 4, 8, 8), 4))
    assert torch.equal(first, explicit)


def test_sample_base_broadcasts_a_single_uncond_and_rejects_bad_latents(unet):
    cond, _ = _pair(batch=2)
    _, uncond = _pair(batch=1)
    out = sample_base(unet, cond, uncond, SampleParams(height=64, width=32, steps=2))
    assert out.shape == (2, 4, 8, 4) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 8, 4\)"):
        sample_base(unet, cond, uncond, SampleParams(height=64, width=32, steps=2), latents=torch.randn(1, 4, 8, 4))
    with pytest.raises(TypeError, match="params must be a SampleParams"):
        sample_base(unet, cond, uncond, {"steps": 2})


# ---- refiner ---------------------------------------------------------------------------------------------------

def test_sdedit_start_follows_diffusers_strength_rule():
    assert sdedit_start(50, 0.3) == (35, 15)
    assert sdedit_start(10, 1.0) == (0, 10)
    assert sdedit_start(4, 0.2) == (4, 0)


def test_refine_sdedit_time_ids_warning_and_errors(refiner):
    cond, uncond = _pair(dim=PRESET.context_dim_refiner, n_ids=5)
    counting = CountingUNet(refiner)
    latents = torch.randn(1, 4, 8, 8)
    with pytest.warns(UserWarning, match="beyond the 200 levels"):
        out = refine_sdedit(counting, latents, cond, uncond, strength=0.3, steps=10, seed=1)
    assert len(counting.batches) == 3 and out.shape == latents.shape
    assert counting.time_ids[0].tolist() == [[64, 64, 0, 0, 2.5], [64, 64, 0, 0, 6.0]]
    with pytest.raises(ValueError, match="strength must be in"):
        refine_sdedit(refiner, latents, cond, uncond, strength=0.0)
    with pytest.raises(ValueError, match="runs no refiner step"):
        refine_sdedit(refiner, latents, cond, uncond, strength=0.05, steps=10)
    with pytest.raises(ValueError, match="latents must be a"):
        refine_sdedit(refiner, torch.randn(1, 3, 8, 8), cond, uncond)
    with pytest.raises(TypeError, match="unexpected keyword"):
        refine_sdedit(refiner, latents, cond, uncond, high_noise_frac=0.8)


def test_ensemble_hands_over_at_high_noise_frac(unet, refiner):
    base_pair, ref_pair = _pair(), _pair(dim=PRESET.context_dim_refiner, n_ids=5)
    base, ref = CountingUNet(unet), CountingUNet(refiner)
    params = SampleParams(height=64, width=64, steps=10, seed=2)
    out = ensemble_of_experts(base, ref, *base_pair, *ref_pair, params, high_noise_frac=0.8)
    # 10 "leading" steps: 901, 801, ..., 1; the base runs t >= 200 (8 steps), the refiner the last 2.
    assert (len(base.batches), len(ref.batches)) == (8, 2) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="high_noise_frac must be a number strictly between 0 and 1"):
        ensemble_of_experts(unet, refiner, *base_pair, *ref_pair, params, high_noise_frac=1.0)
    two_steps = SampleParams(height=64, width=64, steps=2)  # timesteps 501, 1
    with pytest.raises(ValueError, match="leaves the refiner no step"):
        ensemble_of_experts(unet, refiner, *base_pair, *ref_pair, two_steps, high_noise_frac=0.9999)
    with pytest.raises(ValueError, match="leaves the base model no step"):
        ensemble_of_experts(unet, refiner, *base_pair, *ref_pair, two_steps, high_noise_frac=0.01)


# ---- decoding --------------------------------------------------------------------------------------------------

def test_decode_latents_runs_in_float32_even_for_a_half_vae():
    vae = build_vae(PRESET).eval()
    latents = torch.randn(2, 4, 8, 8)
    reference = decode_latents(vae, latents)
    side = 8 * PRESET.vae_downsample
    assert reference.shape == (2, 3, side, side) and reference.dtype == torch.float32
    assert reference.min() >= 0 and reference.max() <= 1
    vae.to(torch.bfloat16)
    again = decode_latents(vae, latents)
    assert next(vae.parameters()).dtype == torch.bfloat16  # restored afterwards
    assert torch.allclose(again, reference, atol=2e-2)  # decoded from upcast (bf16-rounded) weights, in float32
    images = to_pil(again)
    assert len(images) == 2 and images[0].size == (side, side) and images[0].mode == "RGB"


def test_decode_latents_refuses_non_finite_values():
    vae = build_vae(PRESET).eval()
    latents = torch.randn(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        decode_latents(vae, latents)
    with pytest.raises(ValueError, match="scale must be > 0"):
        decode_latents(vae, torch.randn(1, 4, 8, 8), scale=0.0)
