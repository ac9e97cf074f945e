"""Our samplers against diffusers' SDXL pipelines, on one set of tiny random components.

Both sides get the same UNets, embeddings, micro-conditioning, scheduler config, steps, guidance and seed; the
latents must agree to 1e-4. diffusers is the independent implementation here: it owns its own loop, CFG batching,
time-id assembly, noise draw and img2img strength / denoising_start logic.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from sdxl.conditioner import Conditioning
from sdxl.presets import get_preset
from sdxl.sampling import SAMPLERS, SampleParams, ensemble_of_experts, make_scheduler, refine_sdedit, sample_base

TOL = 1e-4
HEIGHT, WIDTH, STEPS, SEED, GUIDANCE = 64, 64, 6, 11, 5.0
DOWN = get_preset("tiny").vae_downsample  # pixels per latent
ORIGINAL, CROP, TARGET = (96, 80), (8, 0), (64, 64)


@pytest.fixture(scope="module")
def parts(tiny_components):
    preset = get_preset("tiny")
    g = torch.Generator().manual_seed(0)

    def embeds(dim):
        return torch.randn(2, 77, dim, generator=g), torch.randn(2, preset.pooled_dim, generator=g)

    base_ctx, base_pooled = embeds(preset.context_dim_base)
    ref_ctx, ref_pooled = embeds(preset.context_dim_refiner)
    return {
        "unet": tiny_components.unet,
        "refiner": tiny_components.refiner_unet,
        "vae": tiny_components.vae,
        # index 0 = prompt, index 1 = negative prompt
        "base": (base_ctx, base_pooled),
        "ref": (ref_ctx, ref_pooled),
    }


def _conds(ctx, pooled, n_ids):
    # time_ids here are placeholders on purpose: sampling must derive them from its parameters.
    cond = Conditioning(ctx[:1], pooled[:1], torch.full((1, n_ids), -1.0))
    uncond = Conditioning(ctx[1:], pooled[1:], torch.full((1, n_ids), -1.0))
    return cond, uncond


def _base_pipe(parts, sampler):
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=parts["unet"], scheduler=make_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _refiner_pipe(parts, sampler):
    pipe = StableDiffusionXLImg2ImgPipeline(vae=parts["vae"], text_encoder=None, text_encoder_2=None, tokenizer=None,
                                            tokenizer_2=None, unet=parts["refiner"], scheduler=make_scheduler(sampler),
                                            requires_aesthetics_score=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embed_kwargs(ctx, pooled):
    return dict(prompt_embeds=ctx[:1], pooled_prompt_embeds=pooled[:1], negative_prompt_embeds=ctx[1:],
                negative_pooled_prompt_embeds=pooled[1:])


def _params(sampler):
    return SampleParams(height=HEIGHT, width=WIDTH, steps=STEPS, guidance_scale=GUIDANCE, sampler=sampler, seed=SEED,
                        original_size=ORIGINAL, crop_coords=CROP, target_size=TARGET, latent_downsample=DOWN)


def _diffusers_base(parts, sampler, **extra):
    return _base_pipe(parts, sampler)(
        **_embed_kwargs(*parts["base"]), height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), original_size=ORIGINAL,
        crops_coords_top_left=CROP, target_size=TARGET, output_type="latent", **extra).images


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_base_matches_diffusers(parts, sampler):
    cond, uncond = _conds(*parts["base"], 6)
    ours = sample_base(parts["unet"], cond, uncond, _params(sampler))
    reference = _diffusers_base(parts, sampler)
    assert ours.shape == (1, 4, HEIGHT // DOWN, WIDTH // DOWN)
    assert (ours - reference).abs().max().item() < TOL
    # The comparison is meaningful only if the sample moved away from the seed noise.
    assert not torch.allclose(ours, torch.randn(ours.shape, generator=torch.Generator().manual_seed(SEED)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_refiner_sdedit_matches_diffusers_img2img(parts, sampler):
    base_latents = torch.randn(1, 4, HEIGHT // DOWN, WIDTH // DOWN, generator=torch.Generator().manual_seed(5))
    cond, uncond = _conds(*parts["ref"], 5)
    strength, steps = 0.5, 8
    ours = refine_sdedit(parts["refiner"], base_latents, cond, uncond, strength=strength, steps=steps,
                         guidance_scale=GUIDANCE, sampler=sampler, seed=SEED, original_size=ORIGINAL,
                         crop_coords=CROP, aesthetic_score=6.0, negative_aesthetic_score=2.5,
                         max_refiner_timestep=1000)
    # diffusers' Img2Img defaults the negative crop to (0, 0); ours defaults to the positive one, so pass it.
    reference = _refiner_pipe(parts, sampler)(
        **_embed_kwargs(*parts["ref"]), image=base_latents, strength=strength, num_inference_steps=steps,
        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), original_size=ORIGINAL,
        crops_coords_top_left=CROP, negative_crops_coords_top_left=CROP, aesthetic_score=6.0,
        negative_aesthetic_score=2.5, output_type="latent").images
    assert (ours - reference).abs().max().item() < TOL
    assert (ours - base_latents).abs().max().item() > 1e-2


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_ensemble_of_experts_matches_denoising_end_start(parts, sampler):
    frac = 0.7
    base_cond, base_uncond = _conds(*parts["base"], 6)
    ref_cond, ref_uncond = _conds(*parts["ref"], 5)
    ours = ensemble_of_experts(parts["unet"], parts["refiner"], base_cond, base_uncond, ref_cond, ref_uncond,
                               _params(sampler), high_noise_frac=frac)
    handover = _diffusers_base(parts, sampler, denoising_end=frac)
    reference = _refiner_pipe(parts, sampler)(
        **_embed_kwargs(*parts["ref"]), image=handover, denoising_start=frac, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), original_size=ORIGINAL,
        crops_coords_top_left=CROP, negative_crops_coords_top_left=CROP, aesthetic_score=6.0,
        negative_aesthetic_score=2.5, output_type="latent").images
    assert (ours - reference).abs().max().item() < TOL
    # The refiner really ran: its output differs from the base's hand-over latents.
    assert (ours - handover).abs().max().item() > 1e-2
