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
# --quick: the same chain with 2-step models on 48 images (tests/test_paper_effects.py).
QUICK_OVERRIDES = ["demo.num_images=48", "train.max_steps=2", "train.checkpoint_every=2",
                   "train.global_batch_size=4", "train.micro_batch_size=4"]


@dataclass
class EffectModels:
    bases: dict  # name → base UNet (EMA weights)
    refiner: torch.nn.Module
    vae: torch.nn.Module
    vae_scale: float
    conditioner: torch.nn.Module  # the base's CLIP-L + bigG, zeros as the unconditional input
    refiner_conditioner: torch.nn.Module  # bigG, "" as the unconditional input
    resolution: int
    sample_steps: int
    guidance_scale: float
    sampler: str = SAMPLER
    real_images: list = field(default_factory=list)  # training images (PIL), for the data's own sharpness
    real_sizes: list = field(default_factory=list)  # their original (h, w)
    training_summary: dict = field(default_factory=dict)


def chain_config(root: str, overrides: list[str] = ()):
    from hydra import compose

    return compose(config_name="config", overrides=[f"paths.root={root}", *overrides, "stage=paper_effects"])


def train_models(root: str, quick: bool = False) -> dict:
    """Run the chain under ``root`` (complete steps are skipped); the workflow's result."""
    import ray
    from hydra import initialize_config_dir

    from pipeline.dispatch import execute

    overrides = [f"paths.root={root}", *(QUICK_OVERRIDES if quick else [])]
    started_here = not ray.is_initialized()
    if started_here:
        from pipeline.ray_env import TRAIN_POLL_ENV

        os.environ.setdefault(TRAIN_POLL_ENV, "0.25")
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with initialize_config_dir(config_dir=CONF, version_base=None):
            cfg = chain_config(root, overrides)
            return execute("paper_effects", cfg, overrides=overrides)
    finally:
        if started_here:
            ray.shutdown()


def step_config(root: str, step: str):
    """The composed config the workflow gave ``step`` (its per-step overrides on the stage it aliases)."""
    from omegaconf import OmegaConf

    from pipeline import workflow

    chain = chain_config(root)
    aliases = OmegaConf.to_container(chain.workflow.aliases, resolve=True)
    per_step = OmegaConf.to_container(chain.workflow.overrides, resolve=True)
    extra = [f"paths.root={root}", *workflow._flatten(per_step.get(step, []))]
    return workflow.compose_stage_config(str(aliases.get(step, step)), [], extra)


def _final_ema(step_cfg, stage: str) -> str:
    return storage.join(str(step_cfg.paths.root), "runs", stage, "final", "ema")


def load_models(root: str, resolution: int, sample_steps: int, guidance_scale: float) -> EffectModels:
    from hydra import initialize_config_dir

    from sdxl.latent_scale import vae_scaling_factor
    from sdxl.models import build_unet
    from stages.train.task_components import build_frozen_parts
    from stages.train.tasks import load_module_weights

    with initialize_config_dir(config_dir=CONF, version_base=None):
        configs = {step: step_config(root, step) for step in (*BASES, "refiner")}
        demo_dir = str(chain_config(root).demo.out_dir)
    device = torch.device("cpu")
    bases = {}
    for name in BASES:
        unet = build_unet(str(configs[name].model.preset), "base", seed=0)
        load_module_weights(unet, _final_ema(configs[name], "pretrain512"))
        bases[name] = unet.eval().requires_grad_(False)
    refiner = build_unet(str(configs["refiner"].model.preset), "refiner", seed=0)
    load_module_weights(refiner, _final_ema(configs["refiner"], "train_refiner"))
    frozen = build_frozen_parts(configs["size_cond"], "base", device)
    frozen.conditioner.force_zeros_for_empty_prompt = True  # what the base trained with (SPEC)
    refiner_text = build_frozen_parts(configs["refiner"], "refiner", device).conditioner
    real, sizes = _training_images(demo_dir, limit=600)
    return EffectModels(bases=bases, refiner=refiner.eval().requires_grad_(False), vae=frozen.vae,
                        vae_scale=vae_scaling_factor(frozen.vae), conditioner=frozen.conditioner,
                        refiner_conditioner=refiner_text, resolution=resolution, sample_steps=sample_steps,
                        guidance_scale=guidance_scale, real_images=real, real_sizes=sizes,
                        training_summary=training_summary(root))


def _training_images(folder: str, limit: int) -> tuple[list, list]:
    """Up to ``limit`` of the generated training images with their original sizes (from the generator's JSON)."""
    images, sizes = [], []
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
    return images, sizes


def training_summary(root: str) -> dict:
    """Per step: seconds, steps, batch and images seen (from the workflow's completion markers)."""
    summary = {}
    for marker in sorted(glob.glob(os.path.join(root, "workflow", "paper_effects", "*.json"))):
        result = storage.read_json(marker).get("result") or {}
        step = os.path.basename(marker)[:-5]
        summary[step] = {k: result[k] for k in ("seconds", "step", "samples", "world_size") if k in result}
    return summary


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


def to_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """[N, 3, H, W] in [0, 1] → uint8 H×W×3 arrays (what the readers take)."""
    return [(img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8) for img in images]
