"""Single-file SDXL checkpoints in the original (Stability ``sgm``) key layout, both directions.

ComfyUI, AUTOMATIC1111 and diffusers' ``from_single_file`` read one safetensors file holding every SDXL network
under these prefixes:

- ``model.diffusion_model.``: the UNet in sgm naming (``input_blocks`` / ``middle_block`` / ``output_blocks``,
  ``time_embed.0/2``, ``label_emb.0.0/0.2`` for the vector-conditioning MLP, ``out.0/2``);
- ``first_stage_model.``: the VAE in LDM naming (``encoder.down.N.block.M``, ``mid.attn_1.q/k/v/proj_out`` as
  1x1 convolution weights);
- base: ``conditioner.embedders.0.transformer.`` (CLIP ViT-L, Hugging Face layout under ``text_model.``) and
  ``conditioner.embedders.1.model.`` (OpenCLIP bigG layout); refiner: bigG only, at ``conditioner.embedders.0.model.``.

Our modules are the diffusers / transformers classes. The mapping (``sdxl.single_file_keys``) is a table of
name-prefix rules derived from the module configs (so it follows the preset: three UNet levels for the base, four
for the refiner), applied by longest-prefix match in either direction. Every key must match a rule, or conversion stops naming the key: nothing
is dropped or invented, and a round trip returns identical tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from sdxl.single_file_keys import (BIGG_PREFIX, CLIP_L_PREFIX, HF_TEXT_MODEL, IGNORED_SUFFIXES, UNET_PREFIX,
                                   VAE_PREFIX, Tensors, clip_l_from_original, clip_l_to_original,
                                   openclip_from_original, openclip_to_original, unet_table, vae_table)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- whole checkpoint
def _with_prefix(prefix: str, state: Mapping[str, torch.Tensor]) -> Tensors:
    return {prefix + k: v for k, v in state.items()}


def to_original_state_dict(kind: str, unet, vae, text_encoder_g, text_encoder_l=None,
                           dtype: torch.dtype | None = None) -> Tensors:
    """The single-file state dict of an SDXL ``kind`` ("base": CLIP-L and bigG, "refiner": bigG only) from our
    modules. ``dtype`` casts floating tensors (e.g. float16 for distribution)."""
    if kind not in BIGG_PREFIX:
        raise ValueError(f"kind must be 'base' or 'refiner', got {kind!r}")
    out: Tensors = {}
    out.update(_with_prefix(UNET_PREFIX, unet_table(unet.config).convert(unet.state_dict(), True, "UNet")))
    out.update(_with_prefix(VAE_PREFIX, vae_table(vae.config).convert(vae.state_dict(), True, "VAE")))
    if kind == "base":
        if text_encoder_l is None:
            raise ValueError("a base checkpoint needs text_encoder_l (CLIP ViT-L)")
        out.update(_with_prefix(CLIP_L_PREFIX, clip_l_to_original(text_encoder_l.state_dict())))
    big_g = openclip_to_original(text_encoder_g.state_dict(), text_encoder_g.config.num_hidden_layers)
    out.update(_with_prefix(BIGG_PREFIX[kind], big_g))
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in out.items()}
    return {k: v.detach().to("cpu").contiguous() for k, v in cast.items()}


def detect_kind(keys) -> str:
    """"base" or "refiner" from the text-encoder keys of an original SDXL checkpoint."""
    keys = set(keys)
    if any(k.startswith(BIGG_PREFIX["base"]) for k in keys) or any(k.startswith(CLIP_L_PREFIX) for k in keys):
        return "base"
    if any(k.startswith(BIGG_PREFIX["refiner"]) for k in keys):
        return "refiner"
    raise ValueError("not an SDXL single-file checkpoint: no text-encoder keys under 'conditioner.embedders.'")


def vae_config_in_file(state: Mapping[str, torch.Tensor], preset_vae: Mapping) -> dict:
    """``preset_vae`` with the widths and depth of the autoencoder in an original-layout ``state`` (a VAE trained
    with ``train.vae.block_out_channels`` differs from its preset there); the preset's when the file has no VAE."""
    widths, level = [], 0
    while f"{VAE_PREFIX}encoder.down.{level}.block.0.conv1.weight" in state:
        widths.append(int(state[f"{VAE_PREFIX}encoder.down.{level}.block.0.conv1.weight"].shape[0]))
        level += 1
    if not widths:
        return dict(preset_vae)
    depth = 0
    while f"{VAE_PREFIX}encoder.down.0.block.{depth}.conv1.weight" in state:
        depth += 1
    return {**preset_vae, "block_out_channels": widths, "layers_per_block": depth}


def split_original_state_dict(state: Mapping[str, torch.Tensor], kind: str, unet_config: Mapping,
                              vae_config: Mapping, num_layers_g: int) -> dict[str, Tensors]:
    """Per-module state dicts in our layout ({"unet", "vae", "text_encoder_2"} plus "text_encoder" for the base)
    from an original single-file state dict. Components absent from the file are absent from the result; keys
    outside the known prefixes are skipped with a warning (checkpoints may carry training leftovers)."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder_2": BIGG_PREFIX[kind]}
    if kind == "base":
        prefixes["text_encoder"] = CLIP_L_PREFIX
    parts: dict[str, Tensors] = {name: {} for name in prefixes}
    skipped = []
    for key, tensor in state.items():
        name = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        if name is None or key.endswith(IGNORED_SUFFIXES):
            skipped.append(key)
            continue
        parts[name][key[len(prefixes[name]):]] = tensor
    if skipped:
        logger.warning("single file: %d keys outside the SDXL %s modules skipped (first: %s)", len(skipped), kind,
                       skipped[:5])
    converters = {
        "unet": lambda s: unet_table(unet_config).convert(s, False, "UNet"),
        "vae": lambda s: vae_table(vae_config).convert(s, False, "VAE"),
        "text_encoder": clip_l_from_original,
        "text_encoder_2": lambda s: openclip_from_original(s, num_layers_g),
    }
    return {name: converters[name](part) for name, part in parts.items() if part}


def read_original_file(path: str) -> Tensors:
    """Tensors of a single-file checkpoint: safetensors, or a torch file read with ``weights_only=True`` (the
    ``{"state_dict": ...}`` wrapper of sgm ``.ckpt`` files is unwrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"single-file checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} does not hold a state dict; got {type(obj).__name__}")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"single-file checkpoint must be .safetensors or .ckpt/.pt/.pth/.bin, got {path!r}")


# ------------------------------------------------------------------------------------------------ save and load
def save_single_file(path: str, kind: str, unet, vae, text_encoder_g, text_encoder_l=None,
                     dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> dict:
    """Write the single-file checkpoint of ``kind`` to ``path`` (.safetensors, atomically). Returns a summary."""
    from sdxl.checkpoint import save_state_dict

    state = to_original_state_dict(kind, unet, vae, text_encoder_g, text_encoder_l, dtype=dtype)
    # The Stability model-spec header that model browsers (and ComfyUI's metadata view) read.
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"stable-diffusion-xl-v1-{kind}",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    save_state_dict(state, path, metadata=meta)
    return {"path": path, "kind": kind, "num_tensors": len(state),
            "num_parameters": int(sum(t.numel() for t in state.values()))}


def _module_factories(preset, kind: str, vae_config: Mapping) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": lambda: UNet2DConditionModel.from_config(preset.unet_config(kind)),
        "vae": lambda: AutoencoderKL.from_config(dict(vae_config)),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**preset.text_encoder_l)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_g)),
    }


def _fit_text_model_level(state: Tensors, expected) -> Tensors:
    """Put back the ``text_model.`` level where this transformers version's module has it."""
    return {(k if k in expected or HF_TEXT_MODEL + k not in expected else HF_TEXT_MODEL + k): v
            for k, v in state.items()}


def _build_loaded(factory, state: Tensors, what: str) -> torch.nn.Module:
    """Build a module on the meta device (no random init of billions of weights) and take ``state`` as its
    weights; every key and shape must fit. Falls back to a CPU build when the module has non-persistent buffers
    (CLIP's position ids) that a state dict cannot fill."""
    with torch.device("meta"):
        module = factory()
    expected = module.state_dict()
    state = _fit_text_model_level(state, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        found = [f"{len(v)} {n} (first: {', '.join(v[:3])})" for n, v in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if v]
        raise ValueError(f"{what} does not fit the preset's module: " + "; ".join(found)
                         + " — was it saved at a different preset?")
    module.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
        module = factory()
        module.load_state_dict(state, strict=True)
    return module


def load_single_file(path: str, preset_name, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """Our modules from an original-layout SDXL file: {"unet", "vae", "text_encoder_2"} and, for a base file,
    "text_encoder". The kind (base or refiner) is read from the file; the module shapes come from the preset
    (``tiny``/``full`` or a ModelPreset). A file without a UNet is refused; a VAE or text encoder missing from the
    file is missing from the result (a warning says so)."""
    from sdxl.presets import get_preset

    preset = get_preset(preset_name)
    state = read_original_file(path)
    kind = detect_kind(state)
    vae_config = vae_config_in_file(state, preset.vae)
    problem = preset.vae_mismatch(vae_config)
    if problem:
        raise ValueError(f"{path}: its autoencoder has {problem}, which does not fit preset {preset.name!r}")
    parts = split_original_state_dict(state, kind, preset.unet_config(kind), vae_config,
                                      preset.text_encoder_g["num_hidden_layers"])
    if "unet" not in parts:
        raise ValueError(f"{path}: no UNet weights under {UNET_PREFIX!r}")
    wanted = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if kind == "base" else [])
    absent = [name for name in wanted if name not in parts]
    if absent:
        logger.warning("%s: no weights for %s in the file", path, absent)
    factories = _module_factories(preset, kind, vae_config)
    modules = {name: _build_loaded(factories[name], part, f"{path} [{name}]") for name, part in parts.items()}
    for module in modules.values():
        if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
            module.to(dtype)
        module.eval()
    return modules
