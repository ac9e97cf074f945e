"""Training task of the base and refiner UNets (SDXL Sec. 2.5).

Loss of a micro-batch: VAE-encode the pixels (posterior sample × 0.13025; or read the cached posterior), text
conditioning with CFG dropout (``train.ucg_rate``, per encoder, to the model's unconditional input: zeros for the
base, the encoding of "" for the refiner; SPEC) and the batch's micro-conditioning — base:
(original size, crop, target size); refiner: (original size, crop, aesthetic score) — then the eps-MSE of
``sdxl.diffusion.diffusion_loss`` with ``train.offset_noise`` and timesteps from ``train.t_range`` ([0, 200) for the
refiner).
"""

from __future__ import annotations

import logging
import math

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from pipeline import storage
from sdxl.conditioner import (Conditioning, TextEmbeddings, base_time_ids, default_unconditional_kind,
                              drop_text_conditioning, refiner_time_ids)
from sdxl.diffusion import check_snr_gamma, check_t_range, diffusion_loss
from sdxl.latent_scale import vae_downsample, vae_scaling_factor
from sdxl.models import build_unet
from sdxl.presets import get_preset
from sdxl.sampling import SampleParams, decode_latents, refine_sdedit, sample_base, to_pil
from stages.train.data_manifest import latent_cache_dir
from stages.train.data_shards import read_safetensors_file
from stages.train.task_components import build_frozen_parts, encode_posterior, sample_posterior
from stages.train.tasks import (DIFFUSERS_WEIGHTS, TrainTask, data_lineage, final_dir, load_module_weights,
                                resolve_init_from, save_module_pretrained, task_option)

DEFAULT_SAMPLE_PROMPTS = ("a photograph of an astronaut riding a horse", "a red cube on a blue sphere",
                          "a watercolor painting of a lighthouse at dusk", "a close-up portrait of a corgi")
# Base stages whose final EMA the refiner's sample grid starts from (newest first): the refiner is an img2img model.
_BASE_STAGES = ("finetune_quality", "finetune_aspect", "pretrain512", "pretrain256")
UNCOND_FILE = "_uncond.safetensors"  # the latent cache's encoding of "" (the refiner's unconditional input)
log = logging.getLogger(__name__)


def sample_settings(cfg) -> dict:
    sample = task_option(cfg, "sample") or {}
    resolution = sample.get("resolution") or int(cfg.loader.resolution)
    return {
        "prompts": list(sample.get("prompts") or DEFAULT_SAMPLE_PROMPTS),
        "seed": int(sample.get("seed", 0)),
        "steps": int(sample.get("steps", 4)),
        "guidance_scale": float(sample.get("guidance_scale", 5.0)),
        "sampler": str(sample.get("sampler", "euler")),
        "resolution": int(resolution),
        "refiner_strength": float(sample.get("refiner_strength", 0.25)),
        "refiner_base": sample.get("refiner_base", "auto"),
    }


class DiffusionTask(TrainTask):
    def __init__(self, cfg, kind: str):
        if kind not in ("base", "refiner"):
            raise ValueError(f"DiffusionTask kind must be 'base' or 'refiner', got {kind!r}")
        self.cfg, self.kind, self.model_name = cfg, kind, kind
        self.preset = get_preset(str(cfg.model.preset))
        self.t_range = check_t_range(task_option(cfg, "t_range"))
        if kind == "refiner" and self.t_range[1] > 200:
            # Not an error (an ablation may want it), but the paper trains the refiner on the first 200 levels only.
            log.warning("refiner trained on t_range=%s; SDXL uses [0, 200)", self.t_range)
        self.offset_noise = float(task_option(cfg, "offset_noise"))
        self.snr_gamma = check_snr_gamma(task_option(cfg, "snr_gamma"))  # fails at start-up, not at the first step
        self.ucg_rate = float(task_option(cfg, "ucg_rate"))
        self.ucg_joint = bool(task_option(cfg, "ucg_joint"))
        self.size_conditioning = bool(task_option(cfg, "size_conditioning"))
        self.cached = bool(cfg.loader.get("cached", False))
        self.init_path = resolve_init_from(cfg)  # fails early, naming the path, when the parent is missing
        self.device = torch.device("cpu")
        self.frozen = None
        self._empty = None
        self._sample_base = None
        self._sample_base_conditioner = None

    # -- model -------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        unet = build_unet(self.preset, self.kind, seed=int(task_option(self.cfg, "seed")))
        if self.init_path is not None:
            load_module_weights(unet, self.init_path)
        return unet.train().requires_grad_(True)

    def setup(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.frozen = build_frozen_parts(self.cfg, self.kind, self.device)
        if self.cached and not self.frozen.conditioner.force_zeros_for_empty_prompt:
            empty = read_safetensors_file(storage.join(latent_cache_dir(self.cfg), UNCOND_FILE))
            self._empty = {k: v.to(self.device) for k, v in empty.items()}

    def wrap_units(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, (Transformer2DModel, ResnetBlock2D))]

    # -- loss --------------------------------------------------------------------------------------------------
    def _require_setup(self) -> None:
        if self.frozen is None:
            raise RuntimeError("call task.setup(device) before loss() / sample_images()")

    def _latents(self, batch: dict, generator) -> torch.Tensor:
        if self.cached:
            parameters = batch["latent_parameters"].to(self.device)
        else:
            parameters = encode_posterior(self.frozen.vae, batch["pixels"])
        return sample_posterior(parameters, vae_scaling_factor(self.frozen.vae), generator)

    def _c_size(self, batch: dict):
        """c_size (Sec. 2.2): the original's size, or with ``train.size_conditioning=false`` the crop's own size,
        a constant that tells the model nothing about the original."""
        return batch["original_size"] if self.size_conditioning else batch["target_size"]

    def _time_ids(self, batch: dict, size: int) -> torch.Tensor:
        if self.kind == "base":
            return base_time_ids(self._c_size(batch), batch["crop_coords"], batch["target_size"], size, self.device)
        return refiner_time_ids(self._c_size(batch), batch["crop_coords"], batch["aesthetic_score"], size,
                                self.device)

    def _conditioning(self, batch: dict, generator) -> Conditioning:
        if not self.cached:
            kwargs = ({"target_size": batch["target_size"]} if self.kind == "base"
                      else {"aesthetic_score": batch["aesthetic_score"]})
            return self.frozen.conditioner.encode_for_training(
                list(batch["captions"]), self._c_size(batch), batch["crop_coords"], ucg_rate=self.ucg_rate,
                generator=generator, ucg_joint=self.ucg_joint, **kwargs)
        # Cached embeddings are the base's CLIP-L ‖ bigG context; the refiner uses the bigG part only.
        context, pooled = batch["context"].to(self.device), batch["pooled"].to(self.device)
        text = self._split_cached(context, pooled)
        if self.ucg_rate > 0:
            text = drop_text_conditioning(text, self._cached_unconditional(context, pooled), self.ucg_rate, generator,
                                          joint=self.ucg_joint)
        return Conditioning(context=text.context, pooled=text.pooled_g, time_ids=self._time_ids(batch, len(pooled)))

    def _split_cached(self, context: torch.Tensor, pooled: torch.Tensor) -> TextEmbeddings:
        width_l = self.preset.text_encoder_l["hidden_size"]
        return TextEmbeddings(context_g=context[..., width_l:], pooled_g=pooled,
                              context_l=context[..., :width_l] if self.kind == "base" else None)

    def _cached_unconditional(self, context: torch.Tensor, pooled: torch.Tensor) -> TextEmbeddings:
        """What cached text is dropped to: zeros (base), or the cache's encoding of "" (refiner)."""
        if self.frozen.conditioner.force_zeros_for_empty_prompt:
            return self._split_cached(torch.zeros_like(context[:1]), torch.zeros_like(pooled[:1]))
        return self._split_cached(self._empty["context"].to(context.dtype), self._empty["pooled"].to(pooled.dtype))

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        self._require_setup()
        latents = self._latents(batch, generator)
        cond = self._conditioning(batch, generator)
        loss, stats = diffusion_loss(model, latents, cond, t_range=self.t_range, offset_noise=self.offset_noise,
                                     generator=generator, snr_gamma=self.snr_gamma)
        metrics = {name: float(value) for name, value in stats.items()}
        return loss, {name: value for name, value in metrics.items() if math.isfinite(value)}

    # -- samples -----------------------------------------------------------------------------------------------
    def _refiner_start_base(self) -> nn.Module:
        """The base UNet whose latents the refiner's sample grid refines (newest finished base stage)."""
        if self._sample_base is None:
            choice = sample_settings(self.cfg)["refiner_base"]
            candidates = [final_dir(self.cfg, s) for s in _BASE_STAGES] if choice in (None, "auto") else [str(choice)]
            base = build_unet(self.preset, "base", seed=int(task_option(self.cfg, "seed")))
            found = next((c for c in candidates if storage.is_file(storage.join(c, DIFFUSERS_WEIGHTS))), None)
            if found is None and choice not in (None, "auto"):
                raise FileNotFoundError(f"train.sample.refiner_base: no weights at {storage.join(str(choice), DIFFUSERS_WEIGHTS)}")
            if found is not None:
                load_module_weights(base, found)
            self._sample_base = base.to(self.device).eval().requires_grad_(False)
            self._sample_base_conditioner = build_frozen_parts(self.cfg, "base", self.device).conditioner
        return self._sample_base

    @torch.no_grad()
    def sample_images(self, model: nn.Module, step: int) -> list:
        self._require_setup()
        s = sample_settings(self.cfg)
        size = (s["resolution"], s["resolution"])
        images = []
        was_training = model.training
        model.eval()
        try:
            down = vae_downsample(self.frozen.vae)
            for i, prompt in enumerate(s["prompts"]):
                params = SampleParams(height=size[0], width=size[1], steps=s["steps"],
                                      guidance_scale=s["guidance_scale"], sampler=s["sampler"], seed=s["seed"] + i,
                                      latent_downsample=down)
                if self.kind == "base":
                    cond, uncond = self.frozen.conditioner.encode_for_sampling(prompt, original_size=size,
                                                                                target_size=size)
                    latents = sample_base(model, cond, uncond, params)
                else:
                    base = self._refiner_start_base()
                    cond, uncond = self._sample_base_conditioner.encode_for_sampling(prompt, original_size=size,
                                                                                       target_size=size)
                    latents = sample_base(base, cond, uncond, params)
                    rcond, runcond = self.frozen.conditioner.encode_for_sampling(prompt, original_size=size)
                    # At least one refiner step, however few sampling steps the grid uses.
                    strength = max(s["refiner_strength"], 1.0 / s["steps"])
                    latents = refine_sdedit(model, latents, rcond, runcond, strength=strength,
                                            steps=s["steps"], guidance_scale=s["guidance_scale"],
                                            sampler=s["sampler"], seed=s["seed"] + i,
                                            latent_downsample=down)
                images += to_pil(decode_latents(self.frozen.vae, latents))
        finally:
            model.train(was_training)
        return images

    # -- output ------------------------------------------------------------------------------------------------
    def save_pretrained(self, model: nn.Module, out_dir: str) -> None:
        save_module_pretrained(model, out_dir)

    def lineage_tags(self) -> dict[str, str]:
        tags = {"task": self.kind, "preset": self.preset.name, "parent_checkpoint": self.init_path or "scratch",
                "t_range": f"{self.t_range[0]}-{self.t_range[1]}", "offset_noise": str(self.offset_noise),
                "snr_gamma": str(self.snr_gamma),
                # What CFG dropout replaced text by: serving and export read it back from final/info.json.
                "unconditional": default_unconditional_kind(self.kind)}
        if self.frozen is not None:
            tags.update(vae_source=self.frozen.vae_source, text_encoders=self.frozen.text_source,
                        unconditional=self.frozen.conditioner.unconditional_kind)
        tags.update(data_lineage(self.cfg))
        return tags
