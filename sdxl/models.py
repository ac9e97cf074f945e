"""Builders for the SDXL components from a preset: random init (fixed seed), meta device, or pretrained weights.

The UNets are diffusers ``UNet2DConditionModel``. On CUDA their attention runs through PyTorch's
``scaled_dot_product_attention`` (diffusers' default ``AttnProcessor2_0``, which picks flash / memory-efficient
kernels), so nothing here overrides the attention processors. The VAE is always kept in float32: SDXL's VAE
overflows in float16 (``force_upcast`` in its config), and encoding/decoding is a small share of the compute.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl.presets import ModelPreset, get_preset
from sdxl.tokenizers import load_tokenizers

KINDS = ("base", "refiner", "both")
# Per-component seed offsets, so each component's random init is the same whichever others are built.
_SEED_OFFSETS = {"unet_base": 0, "unet_refiner": 1, "vae": 2, "text_encoder_l": 3, "text_encoder_g": 4}


@dataclass(kw_only=True)
class SDXLComponents:
    """Everything a base and/or refiner needs. Fields a ``kind`` does not use are None (the refiner alone has no
    CLIP-L encoder, tokenizer 1 or base UNet)."""

    unet: UNet2DConditionModel | None = None
    refiner_unet: UNet2DConditionModel | None = None
    vae: AutoencoderKL
    text_encoder_l: CLIPTextModel | None = None
    text_encoder_g: CLIPTextModelWithProjection
    tokenizer_l: CLIPTokenizer | None = None
    tokenizer_g: CLIPTokenizer
    preset: ModelPreset


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on meta-device modules)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def _init_context(device: str | torch.device, seed: int):
    """Meta device: no memory, no RNG. Otherwise build on CPU from a private CPU RNG seeded with ``seed`` (the global
    RNG is left as it was), so every process gets identical weights; the caller moves them to ``device``."""
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def place_module(module: nn.Module, device, dtype: torch.dtype | None) -> nn.Module:
    """Move, and cast only when the dtype changes (diffusers warns on every dtype ``.to``)."""
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    if torch.device(device).type != "meta":
        module = module.to(device=device)
    return module


def build_unet(preset: ModelPreset | str, kind: str = "base", device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, seed: int = 0) -> UNet2DConditionModel:
    """A randomly initialised base or refiner UNet (``kind``) of ``preset``; ``device="meta"`` for counting."""
    preset = get_preset(preset)
    config = preset.unet_config(kind)
    with _init_context(device, seed + _SEED_OFFSETS[f"unet_{kind}"]):
        unet = UNet2DConditionModel(**config)
    return place_module(unet, device, dtype)


def build_vae(preset: ModelPreset | str, device: str | torch.device = "cpu", seed: int = 0,
              config: dict | None = None) -> AutoencoderKL:
    """A randomly initialised SDXL autoencoder (float32 always): the preset's, or ``config`` (a
    ``ModelPreset.vae_config`` or a trained VAE's saved config)."""
    preset = get_preset(preset)
    config = preset.vae if config is None else config
    problem = preset.vae_mismatch(config)
    if problem:
        raise ValueError(f"an autoencoder with {problem} does not fit preset {preset.name!r}")
    with _init_context(device, seed + _SEED_OFFSETS["vae"]):
        vae = AutoencoderKL(**config)
    return place_module(vae, device, torch.float32)


def build_text_encoder_l(preset: ModelPreset | str, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None, seed: int = 0) -> CLIPTextModel:
    """A randomly initialised CLIP ViT-L/14 text encoder (penultimate hidden states feed the base UNet)."""
    preset = get_preset(preset)
    with _init_context(device, seed + _SEED_OFFSETS["text_encoder_l"]):
        model = CLIPTextModel(CLIPTextConfig(**preset.text_encoder_l))
        _init_text_embeddings(model, preset.clip_l_embedding_std)
    return place_module(model, device, dtype)


def build_text_encoder_g(preset: ModelPreset | str, device: str | torch.device = "cpu",
                         dtype: torch.dtype | None = None, seed: int = 0) -> CLIPTextModelWithProjection:
    """A randomly initialised OpenCLIP ViT-bigG/14 text encoder with its pooled-output projection."""
    preset = get_preset(preset)
    with _init_context(device, seed + _SEED_OFFSETS["text_encoder_g"]):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_g))
    return place_module(model, device, dtype)


def _init_text_embeddings(model: nn.Module, std: float | None) -> None:
    """Redraw the token and position embeddings with ``std`` (the preset's ``clip_l_embedding_std``); None keeps CLIP's.
    Runs inside ``_init_context``, so the draw is seeded like the rest of the init."""
    if std is None or next(model.parameters()).device.type == "meta":
        return
    embeddings = [module for name, module in model.named_modules()
                  if name.endswith(("token_embedding", "position_embedding"))]
    if len(embeddings) != 2:
        raise RuntimeError(f"expected a token and a position embedding in {type(model).__name__}, "
                           f"found {len(embeddings)}")
    with torch.no_grad():
        for module in embeddings:
            module.weight.normal_(0.0, std)


def build_text_encoders(preset: ModelPreset | str, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, seed: int = 0
                        ) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """Randomly initialised (CLIP ViT-L/14 text, OpenCLIP ViT-bigG/14 text with projection)."""
    return (build_text_encoder_l(preset, device, dtype, seed), build_text_encoder_g(preset, device, dtype, seed))


def build_on_meta(preset: ModelPreset | str) -> dict[str, nn.Module]:
    """Every component of ``preset`` on the meta device (no memory), for parameter counts and shape checks."""
    preset = get_preset(preset)
    text_l, text_g = build_text_encoders(preset, device="meta")
    return {
        "unet_base": build_unet(preset, "base", device="meta"),
        "unet_refiner": build_unet(preset, "refiner", device="meta"),
        "vae": build_vae(preset, device="meta"),
        "text_encoder_l": text_l,
        "text_encoder_g": text_g,
    }


def _check_matches_preset(source: str, what: str, actual: dict, expected: dict, keys: tuple[str, ...],
                          preset: ModelPreset) -> None:
    for key in keys:
        if actual.get(key) != expected.get(key):
            raise ValueError(
                f"{source}/{what} has {key}={actual.get(key)!r} but preset {preset.name!r} expects "
                f"{expected.get(key)!r}: set model.preset to the size of the pretrained weights"
            )


def _load_unet(source: str, preset: ModelPreset, kind: str, dtype) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
    _check_matches_preset(source, "unet", dict(unet.config), preset.unet_config(kind),
                          ("in_channels", "cross_attention_dim", "projection_class_embeddings_input_dim"), preset)
    return unet


def _load_vae(source: str, preset: ModelPreset) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
    problem = preset.vae_mismatch(dict(vae.config))
    if problem:
        raise ValueError(f"{source}/vae has {problem}: set model.preset to the size of the pretrained weights")
    return vae


def _load_text_encoder(cls, source: str, subfolder: str, expected: dict, preset: ModelPreset, dtype):
    model = cls.from_pretrained(source, subfolder=subfolder, dtype=dtype)
    _check_matches_preset(source, subfolder, model.config.to_dict(), expected, ("hidden_size", "projection_dim"),
                          preset)
    return model


def build_components(preset_name: str | ModelPreset = "tiny", kind: str = "base", pretrained: str | None = None,
                     pretrained_refiner: str | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, tokenizer_cache: str | None = None,
                     seed: int = 0) -> SDXLComponents:
    """Build the components for ``kind`` = ``base``, ``refiner`` or ``both``.

    ``pretrained``: a diffusers-format SDXL base folder or hub id (``unet/ vae/ text_encoder/ text_encoder_2/
    tokenizer/ tokenizer_2/``), loaded with ``from_pretrained``; ``pretrained_refiner`` likewise for the refiner
    (``unet/`` plus its ``vae/ text_encoder_2/ tokenizer_2/``). The VAE, bigG encoder and tokenizer 2 that base and
    refiner share come from ``pretrained`` when given, else from ``pretrained_refiner``. Whatever has no source is
    randomly initialised from ``seed`` (tokenizers then use the built-in CLIP vocabulary). UNets and text encoders
    get ``dtype``; the VAE stays float32. All modules are returned in eval mode with the text encoders frozen
    (SDXL never trains them); a trainer calls ``.train()`` on what it trains.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    preset = get_preset(preset_name)
    want_base = kind in ("base", "both")
    want_refiner = kind in ("refiner", "both")
    shared_source = pretrained or (pretrained_refiner if want_refiner else None)

    unet = refiner_unet = None
    if want_base:
        unet = (_load_unet(pretrained, preset, "base", dtype) if pretrained
                else build_unet(preset, "base", dtype=dtype, seed=seed))
    if want_refiner:
        refiner_unet = (_load_unet(pretrained_refiner, preset, "refiner", dtype) if pretrained_refiner
                        else build_unet(preset, "refiner", dtype=dtype, seed=seed))

    vae = _load_vae(shared_source, preset) if shared_source else build_vae(preset, seed=seed)
    text_l = None
    if want_base:
        text_l = (_load_text_encoder(CLIPTextModel, pretrained, "text_encoder", preset.text_encoder_l, preset, dtype)
                  if pretrained else build_text_encoder_l(preset, dtype=dtype, seed=seed))
    if shared_source:
        text_g = _load_text_encoder(CLIPTextModelWithProjection, shared_source, "text_encoder_2",
                                    preset.text_encoder_g, preset, dtype)
    else:
        text_g = build_text_encoder_g(preset, dtype=dtype, seed=seed)

    if want_base and shared_source != pretrained:
        # Base without a folder next to a refiner from one: tokenizer 1 is the built-in one (refiner folders lack it).
        tokenizer_l = load_tokenizers(None, tokenizer_cache)[0]
        tokenizer_g = load_tokenizers(shared_source, tokenizer_cache, need_l=False)[1]
    else:
        tokenizer_l, tokenizer_g = load_tokenizers(shared_source, tokenizer_cache, need_l=want_base)

    for encoder in (text_l, text_g):
        if encoder is not None:
            encoder.requires_grad_(False)
    modules = [m for m in (unet, refiner_unet, text_l, text_g) if m is not None]
    for module in modules:
        place_module(module, device, None).eval()
    place_module(vae, device, torch.float32).eval()
    return SDXLComponents(unet=unet, refiner_unet=refiner_unet, vae=vae, text_encoder_l=text_l,
                          text_encoder_g=text_g, tokenizer_l=tokenizer_l, tokenizer_g=tokenizer_g, preset=preset)
