"""The frozen parts of a diffusion stage (VAE, text encoders) and the posterior sampling shared by the diffusion
task and the latent cache.

Sources, in order: the VAE of a finished ``train_vae`` stage (``train.vae_from: auto``), else the diffusers folder or
hub id in ``model.pretrained`` (``model.pretrained_refiner`` for a refiner-only setup), else the preset's seeded random
init (tiny runs). Text encoders come from ``model.pretrained`` or the preset. Everything is returned in eval mode
with ``requires_grad=False``: SDXL never trains them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pipeline import storage
from sdxl.conditioner import TextConditioner
from sdxl.diffusion import make_noise
from sdxl.models import build_text_encoder_g, build_text_encoder_l, build_vae, place_module
from sdxl.presets import get_preset
from sdxl.tokenizers import load_tokenizers
from stages.train.tasks import DIFFUSERS_WEIGHTS, final_dir, load_module_weights, task_option, torch_dtype


@dataclass
class FrozenParts:
    vae: AutoencoderKL
    conditioner: TextConditioner
    vae_source: str  # "trained:<path>" | "pretrained:<id>" | "preset:<name>"
    text_source: str


def _pretrained_source(cfg) -> str | None:
    model = cfg.get("model") or {}
    return model.get("pretrained") or model.get("pretrained_refiner") or None


def resolve_vae_source(cfg) -> tuple[str, str | None]:
    """("trained", folder) | ("pretrained", id) | ("preset", None) for the frozen VAE."""
    vae_from = task_option(cfg, "vae_from")
    if vae_from in (None, "", "preset", "pretrained"):
        source = _pretrained_source(cfg) if vae_from != "preset" else None
        return ("pretrained", source) if source else ("preset", None)
    if str(vae_from) == "auto":
        folder = final_dir(cfg, "train_vae")
        if storage.is_file(storage.join(folder, DIFFUSERS_WEIGHTS)):
            return "trained", folder
        source = _pretrained_source(cfg)
        return ("pretrained", source) if source else ("preset", None)
    folder = str(vae_from)
    if not storage.is_file(storage.join(folder, DIFFUSERS_WEIGHTS)):
        raise FileNotFoundError(f"train.vae_from: no VAE weights at {storage.join(folder, DIFFUSERS_WEIGHTS)}")
    return "trained", folder


def load_trained_vae(folder: str, preset) -> AutoencoderKL:
    """A train_vae output folder as an AutoencoderKL. Its saved config.json decides the architecture
    (``train.vae.block_out_channels`` / ``layers_per_block`` may have widened it; the preset still fixes the latent
    channels and grid) and carries the latent scale factor train_vae measured: a preset-built VAE would keep the
    preset's constant (SDXL's 0.13025), and the diffusion stages would train on latents of the wrong size while the
    export (which copies the saved config) samples with the right one. The weights load with every key and shape
    checked; a folder without config.json is taken as the preset's architecture."""
    config_uri = storage.join(folder, "config.json")
    config = None
    if storage.is_file(config_uri):
        saved = storage.read_json(config_uri)
        config = {**preset.vae, **{key: saved[key] for key in preset.vae if saved.get(key) is not None}}
        problem = preset.vae_mismatch(config)
        if problem:
            raise ValueError(f"the autoencoder in {folder} has {problem}: model.preset={preset.name!r} does not fit it")
    return load_module_weights(build_vae(preset, config=config), folder)


def build_frozen_vae(cfg, device: torch.device) -> tuple[AutoencoderKL, str]:
    preset = get_preset(str(cfg.model.preset))
    kind, source = resolve_vae_source(cfg)
    if kind == "pretrained":
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
        problem = preset.vae_mismatch(dict(vae.config))  # as every other VAE loader checks it
        if problem:
            raise ValueError(f"{source}/vae has {problem} for preset {preset.name!r}: set model.preset to match")
    else:
        vae = (load_trained_vae(source, preset) if kind == "trained"
               else build_vae(preset, seed=int(task_option(cfg, "seed"))))
    vae = place_module(vae, device, torch.float32).eval().requires_grad_(False)
    return vae, f"{kind}:{source or preset.name}"


def build_text_conditioner(cfg, kind: str, device: torch.device) -> tuple[TextConditioner, str]:
    """Tokenizers + text encoders for ``kind`` ("base": CLIP-L and bigG; "refiner": bigG only)."""
    preset = get_preset(str(cfg.model.preset))
    dtype = torch_dtype(task_option(cfg, "frozen_dtype")) if device.type != "cpu" else torch.float32
    need_l = kind == "base"
    model = cfg.get("model") or {}
    source = model.get("pretrained") or (model.get("pretrained_refiner") if not need_l else None)
    tok_l, tok_g = load_tokenizers(source, model.get("tokenizer_cache"), need_l=need_l)
    seed = int(task_option(cfg, "seed"))
    if source:
        enc_l = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype) if need_l else None
        enc_g = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype)
        if enc_g.config.hidden_size != preset.text_encoder_g["hidden_size"]:
            raise ValueError(f"{source}/text_encoder_2 has hidden_size {enc_g.config.hidden_size}, preset "
                             f"{preset.name!r} expects {preset.text_encoder_g['hidden_size']}")
    else:
        enc_l = build_text_encoder_l(preset, dtype=dtype, seed=seed) if need_l else None
        enc_g = build_text_encoder_g(preset, dtype=dtype, seed=seed)
    for encoder in (enc_l, enc_g):
        if encoder is not None:
            encoder.to(device).eval().requires_grad_(False)
    conditioner = TextConditioner(tok_l, enc_l, tok_g, enc_g, kind=kind).eval()
    return conditioner, f"pretrained:{source}" if source else f"preset:{preset.name}"


def build_frozen_parts(cfg, kind: str, device: torch.device) -> FrozenParts:
    vae, vae_source = build_frozen_vae(cfg, device)
    conditioner, text_source = build_text_conditioner(cfg, kind, device)
    return FrozenParts(vae, conditioner, vae_source, text_source)


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior parameters [B, 8, h, w] = mean ‖ logvar of ``pixels`` in [-1, 1] (float32)."""
    device = next(vae.parameters()).device
    dist = vae.encode(pixels.to(device=device, dtype=torch.float32)).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1)


def sample_posterior(parameters: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled latents ``scale · (mean + std · ε)`` from posterior parameters (logvar clamped as diffusers does)."""
    mean, logvar = parameters.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = make_noise(mean.shape, 0.0, generator, mean.device, torch.float32)
    return (mean + std * eps) * scale
