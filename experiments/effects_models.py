"""The models of ``stage=paper_effects``: training them through the pipeline, loading them, and sampling them.

Training runs the workflow chain of pipeline/conf/stage/paper_effects.yaml on an embedded Ray, as the CLI does.
Loading rebuilds each step's own config (the same composition the workflow used), so the frozen autoencoder and text
encoders are exactly those the models trained with. Sampling uses sdxl.sampling with one initial noise per seed, the
same in every setting.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pipeline import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO, "pipeline", "conf")
BASES = ("size_cond", "no_size_cond", "large_only")
SAMPLER = "euler"
REFINER_SCORE = 5.0  # the loader's score for unscored data: the only aesthetic score the refiner saw


@dataclass
class EffectModels:
    bases: dict  # name → base UNet (EMA weights)
    refiner: torch.nn.Module | None  # None when loaded without it (experiments/layout_probe.py)
    vae: torch.nn.Module
    vae_scale: float
    conditioner: torch.nn.Module  # the base's CLIP-L + bigG, zeros as the unconditional input
    refiner_conditioner: torch.nn.Module | None  # bigG, "" as the unconditional input
    resolution: int
    sample_steps: int
    guidance_scale: float
    sampler: str = SAMPLER
    real_images: list = field(default_factory=list)  # training images (PIL), for the data's own sharpness
    real_sizes: list = field(default_factory=list)  # their original (h, w)
    real_captions: list = field(default_factory=list)
    training_summary: dict = field(default_factory=dict)


def chain_config(root: str, overrides: list[str] = ()):
    from hydra import compose

    return compose(config_name="config", overrides=[f"paths.root={root}", *overrides, "stage=paper_effects"])


def train_models(root: str, chain_overrides: list[str] = ()) -> dict:
    """Run the chain under ``root`` (complete steps are skipped) as the CLI does, with ``chain_overrides`` such as
    ``workflow.layout_steps=2400``: ``execute`` starts the embedded Ray (pipeline/ray_env.py) when none is running.
    The workflow's result."""
    from hydra import initialize_config_dir

    from pipeline.dispatch import execute

    overrides = [f"paths.root={root}", *chain_overrides]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return execute("paper_effects", chain_config(root, overrides), overrides=overrides)


def step_configs(root: str, steps, chain_overrides: list[str] = ()) -> dict:
    """The composed configs the workflow gives ``steps`` (each one's per-step overrides on the stage it aliases)."""
    from pipeline import workflow

    cfg = chain_config(root, chain_overrides)
    chain = {step: (stage, extra) for step, stage, extra in workflow.chain_steps(cfg, root)}
    return {step: workflow.compose_stage_config(chain[step][0], [], chain[step][1]) for step in steps}


def _final_ema(step_cfg, stage: str) -> str:
    return storage.join(str(step_cfg.paths.root), "runs", stage, "final", "ema")


def load_models(root: str, resolution: int, sample_steps: int, guidance_scale: float, bases: dict | None = None,
                with_refiner: bool = True) -> EffectModels:
    """The chain's trained models under ``root``. ``bases`` maps a name to the (chain step, stage) whose final EMA
    weights to load (default: every base of BASES after its detail phase, ``pretrain512``); the frozen autoencoder
    and text encoders come from the first base's step config."""
    from hydra import initialize_config_dir

    from sdxl.latent_scale import vae_scaling_factor
    from sdxl.models import build_unet
    from stages.train.task_components import build_frozen_parts
    from stages.train.tasks import load_module_weights

    bases = bases or {name: (name, "pretrain512") for name in BASES}
    steps = {step for step, _ in bases.values()} | ({"refiner"} if with_refiner else set())
    with initialize_config_dir(config_dir=CONF, version_base=None):
        configs = step_configs(root, sorted(steps))
        chain = chain_config(root)
        demo_dir, chain_order = str(chain.demo.out_dir), [str(step) for step in chain.workflow.chain]
    device = torch.device("cpu")
    loaded = {}
    for name, (step, stage) in bases.items():
        unet = build_unet(str(configs[step].model.preset), "base", seed=0)
        load_module_weights(unet, _final_ema(configs[step], stage))
        loaded[name] = unet.eval().requires_grad_(False)
    refiner = refiner_text = None
    if with_refiner:
        refiner = build_unet(str(configs["refiner"].model.preset), "refiner", seed=0)
        load_module_weights(refiner, _final_ema(configs["refiner"], "train_refiner"))
        refiner = refiner.eval().requires_grad_(False)
        refiner_text = build_frozen_parts(configs["refiner"], "refiner", device).conditioner
    frozen = build_frozen_parts(configs[next(iter(bases.values()))[0]], "base", device)
    frozen.conditioner.force_zeros_for_empty_prompt = True  # what the base trained with (SPEC)
    real, sizes, captions = _training_images(demo_dir, limit=600)
    return EffectModels(bases=loaded, refiner=refiner, vae=frozen.vae,
                        vae_scale=vae_scaling_factor(frozen.vae), conditioner=frozen.conditioner,
                        refiner_conditioner=refiner_text, resolution=resolution, sample_steps=sample_steps,
                        guidance_scale=guidance_scale, real_images=real, real_sizes=sizes, real_captions=captions,
                        training_summary=training_summary(root, chain_order))


def _training_images(folder: str, limit: int) -> tuple[list, list, list]:
    """Up to ``limit`` of the generated training images with their original sizes and captions (from the
    generator's JSON)."""
    from stages.data.demo_data import caption_for

    images, sizes, captions = [], [], []
    for meta in sorted(glob.glob(os.path.join(folder, "*", "*.json")))[:limit]:
        stem = meta[:-5]
        path = next((stem + ext for ext in (".png", ".jpg") if os.path.isfile(stem + ext)), None)
        if path is None:
            continue
        with open(meta) as handle:
            params = json.load(handle)
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
        sizes.append((int(params["orig_h"]), int(params["orig_w"])))
        captions.append(caption_for(params))
    return images, sizes, captions


def training_summary(root: str, chain_order: list[str] = ()) -> dict:
    """Per step, in ``chain_order`` (then any other step by name): steps, images and world size (from the workflow's
    completion markers; a step's seconds there are those of the call that last completed it, which is a few seconds
    when it found its model already trained)."""
    found = {}
    for marker in glob.glob(os.path.join(root, "workflow", "paper_effects", "*.json")):
        result = storage.read_json(marker).get("result") or {}
        found[os.path.basename(marker)[:-5]] = {k: result[k] for k in ("seconds", "step", "samples", "world_size")
                                                if k in result}
    rank = {step: i for i, step in enumerate(chain_order)}
    return {step: found[step] for step in sorted(found, key=lambda step: (rank.get(step, len(rank)), step))}


@torch.no_grad()
def sample(models: EffectModels, base: str, prompts: list[str], seeds: list[int], c_sizes: list, c_crops: list,
           refiner_strength: float | None = None, batch_size: int = 64) -> torch.Tensor:
    """Images [N, 3, r, r] in [0, 1]: sample i from ``prompts[i % len]`` and the initial noise of ``seeds[i]``, with
    micro-conditioning (c_size, c_crop) ``c_sizes[i]``, ``c_crops[i]``; refined by SDEdit when a strength is given."""
    from sdxl.latent_scale import vae_downsample
    from sdxl.sampling import SampleParams, decode_latents, initial_noise, refine_sdedit, sample_base

    r, down = models.resolution, vae_downsample(models.vae)
    n = len(seeds)
    out = torch.empty(n, 3, r, r)
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        groups.setdefault((tuple(c_sizes[i]), tuple(c_crops[i])), []).append(i)
    for (c_size, c_crop), members in groups.items():
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            batch = [prompts[i % len(prompts)] for i in idx]
            noise = torch.cat([initial_noise((1, 4, r // down, r // down), seeds[i]) for i in idx])
            cond, uncond = models.conditioner.encode_for_sampling(batch, original_size=c_size, crop_coords=c_crop,
                                                                  target_size=(r, r))
            params = SampleParams(height=r, width=r, steps=models.sample_steps, guidance_scale=models.guidance_scale,
                                  sampler=models.sampler, seed=0, original_size=c_size, crop_coords=c_crop,
                                  target_size=(r, r), latent_downsample=down)
            latents = sample_base(models.bases[base], cond, uncond, params, latents=noise)
            if refiner_strength is not None:
                rcond, runcond = models.refiner_conditioner.encode_for_sampling(batch, original_size=c_size)
                latents = refine_sdedit(models.refiner, latents, rcond, runcond, strength=refiner_strength,
                                        steps=models.sample_steps, guidance_scale=models.guidance_scale,
                                        sampler=models.sampler, seed=idx[0], original_size=c_size,
                                        aesthetic_score=REFINER_SCORE, negative_aesthetic_score=REFINER_SCORE)
            out[idx] = decode_latents(models.vae, latents, models.vae_scale).float().cpu()
    return out


@torch.no_grad()
def micro_conditioning_use(models: EffectModels, base: str, seed: int = 0) -> dict:
    """Does the model use c_crop and c_size at all? Training images cropped by Alg. 1 at the training size and
    encoded by the VAE are denoised once with their true micro-conditioning and once with a wrong one (same caption,
    noise and timesteps; stages/evaluate/conditioning_use.py's x0 error): c_crop mirrored along the cropped side
    (the object then belongs on the other side), at the layout timesteps; c_size swapped between small (< training
    size) and large originals, at the detail timesteps. gain = relative rise of the error; z = mean / standard error
    of the per-image rise (the model uses it when z >> 3)."""
    from sdxl.conditioner import base_time_ids
    from sdxl.crops import bucket_crop_resize, cover_size
    from sdxl.diffusion import default_schedule
    from stages.evaluate.conditioning_use import x0_errors

    r, rng = models.resolution, np.random.default_rng(seed)
    pixels, sizes, crops, wrong_crops, wrong_sizes, captions = [], [], [], [], [], []
    for image, (h, w), caption in zip(models.real_images, models.real_sizes, models.real_captions):
        out, info = bucket_crop_resize(image, (r, r), rng=rng)
        spare = [a - r for a in cover_size((h, w), (r, r))]
        mirror = (spare[0] - info.c_crop[0], spare[1] - info.c_crop[1])
        pixels.append(np.asarray(out, dtype=np.float32) / 127.5 - 1)
        sizes.append((h, w))
        crops.append(info.c_crop)
        # Mirrored only where that moves the object (a square original has nowhere to go): None marks the rest.
        wrong_crops.append(mirror if max(abs(m - c) for m, c in zip(mirror, info.c_crop)) >= 4 else None)
        scale = (3 * r if min(h, w) < r else 12) / min(h, w)  # small ↔ large, same aspect
        wrong_sizes.append((max(1, round(h * scale)), max(1, round(w * scale))))
        captions.append(caption)
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    latents = torch.cat([models.vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)])
    latents = latents * models.vae_scale
    target = (r, r)
    schedule = default_schedule()
    unet = models.bases[base]

    def rise(wrong_ids, keep, timesteps):
        idx = [i for i, k in enumerate(keep) if k]
        context, pooled = models.conditioner.encode([captions[i] for i in idx])
        noise = torch.randn((len(timesteps), len(idx), *latents.shape[1:]),
                            generator=torch.Generator().manual_seed(seed))
        true_ids = base_time_ids([sizes[i] for i in idx], [crops[i] for i in idx], target, len(idx))
        args = (context, pooled)
        err_true = x0_errors(unet, latents[idx], *args, true_ids, timesteps, noise, schedule.alphas_cumprod)
        err_wrong = x0_errors(unet, latents[idx], *args, wrong_ids(idx), timesteps, noise, schedule.alphas_cumprod)
        diff = (err_wrong - err_true).mean(dim=0)
        base_err = float(err_true.mean())
        spread = float(diff.std()) / max(1, len(idx)) ** 0.5
        return {"num_images": len(idx), "timesteps": list(timesteps), "x0_mse_true": base_err,
                "gain": float(diff.mean()) / base_err if base_err > 0 else 0.0,
                "z": float(diff.mean()) / spread if spread > 0 else 0.0}

    crop = rise(lambda idx: base_time_ids([sizes[i] for i in idx], [wrong_crops[i] for i in idx], target, len(idx)),
                [c is not None for c in wrong_crops], (500, 700, 900))
    size = rise(lambda idx: base_time_ids([wrong_sizes[i] for i in idx], [crops[i] for i in idx], target, len(idx)),
                [True] * len(sizes), (50, 100, 200))
    return {"crop": crop, "size": size}
