"""Single-file SDXL checkpoints in the original (Stability ``sgm``) key layout, both directions.

ComfyUI, AUTOMATIC1111 and diffusers' ``from_single_file`` read one safetensors file holding every SDXL network
under these prefixes:

- ``model.diffusion_model.``: the UNet in sgm naming (``input_blocks`` / ``middle_block`` / ``output_blocks``,
  ``time_embed.0/2``, ``label_emb.0.0/0.2`` for the vector-conditioning MLP, ``out.0/2``);
- ``first_stage_model.``: the VAE in LDM naming (``encoder.down.N.block.M``, ``mid.attn_1.q/k/v/proj_out`` as
  1x1 convolution weights);
- base: ``conditioner.embedders.0.transformer.`` (CLIP ViT-L, Hugging Face layout under ``text_model.``) and
  ``conditioner.embedders.1.model.`` (OpenCLIP bigG layout); refiner: bigG only, at ``conditioner.embedders.0.model.``.

Our modules are the diffusers / transformers classes. The mapping is a table of name-prefix rules derived from the
module configs (so it follows the preset: three UNet levels for the base, four for the refiner), applied by
longest-prefix match in either direction. Every key must match a rule, or conversion stops naming the key: nothing
is dropped or invented, and a round trip returns identical tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
_HF_TEXT_MODEL = "text_model."
# Entries some original checkpoints carry that hold no weights of ours (open_clip's contrastive temperature, the
# position-id buffer older transformers saved): accepted and skipped on load.
_IGNORED_SUFFIXES = ("logit_scale", "position_ids")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """Keys starting with ``ours`` map to keys starting with ``original``. ``inner`` (when given) renames what follows
    the prefix and must cover every such key; ``as_conv`` stores 2-D linear weights as [out, in, 1, 1] convolutions."""

    ours: str
    original: str
    inner: Mapping[str, str] | None = None
    as_conv: bool = False


@dataclass
class KeyTable:
    rules: list[Rule] = field(default_factory=list)

    def add(self, ours: str, original: str, inner: Mapping[str, str] | None = None, as_conv: bool = False) -> None:
        self.rules.append(Rule(ours, original, inner, as_conv))

    def convert(self, state: Mapping[str, torch.Tensor], to_original: bool, what: str) -> Tensors:
        by_prefix = {(r.ours if to_original else r.original): r for r in self.rules}
        out: Tensors = {}
        for key, tensor in state.items():
            rule = _longest_prefix_rule(key, by_prefix)
            if rule is None:
                raise KeyError(f"{what}: no mapping rule for key {key!r}")
            src, dst = (rule.ours, rule.original) if to_original else (rule.original, rule.ours)
            rest = key[len(src):]
            if rule.inner is not None:
                inner = rule.inner if to_original else {v: k for k, v in rule.inner.items()}
                name = next((n for n in sorted(inner, key=len, reverse=True) if rest.startswith(n)), None)
                if name is None:
                    raise KeyError(f"{what}: key {key!r} has no known sub-name after {src!r}")
                rest = inner[name] + rest[len(name):]
            new_key = dst + rest
            if new_key in out:
                raise KeyError(f"{what}: two keys map to {new_key!r}")
            if rule.as_conv and to_original and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            elif rule.as_conv and not to_original and tensor.ndim > 2:
                tensor = _conv1x1_to_linear(tensor, key)
            out[new_key] = tensor
        return out


def _longest_prefix_rule(key: str, by_prefix: Mapping[str, Rule]) -> Rule | None:
    """The rule whose prefix is the longest dot-delimited start of ``key`` (an empty prefix matches everything)."""
    parts = key.split(".")
    for n in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:n]) + ("." if n else "")
        if prefix in by_prefix:
            return by_prefix[prefix]
    return None


def _conv1x1_to_linear(tensor: torch.Tensor, key: str) -> torch.Tensor:
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]
    raise ValueError(f"{key!r}: expected a [C, C, 1, 1] attention weight, got shape {tuple(tensor.shape)}")


# --------------------------------------------------------------------------------------------------------- UNet
_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}


def unet_table(config: Mapping) -> KeyTable:
    """Rules for a diffusers ``UNet2DConditionModel`` config. sgm numbers the encoder blocks 1.. in order (each level:
    ``layers_per_block`` resnet(+attention) blocks, then a downsampler block except at the last level) and the
    decoder blocks 0.. (each level: ``layers_per_block + 1`` blocks; the last one ends with the upsampler, after the
    attention when there is one)."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise ValueError(f"layers_per_block must be one int for the sgm layout, got {per_level!r}")
    table = KeyTable()
    for ours, original in [("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
                           ("time_embedding.linear_2.", "time_embed.2."), ("add_embedding.linear_1.", "label_emb.0.0."),
                           ("add_embedding.linear_2.", "label_emb.0.2."), ("conv_norm_out.", "out.0."),
                           ("conv_out.", "out.2.")]:
        table.add(ours, original)
    for level, block_type in enumerate(config["down_block_types"]):
        for j in range(per_level):
            index = 1 + level * (per_level + 1) + j
            table.add(f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{index}.0.", _UNET_RESNET)
            if "CrossAttn" in block_type:
                table.add(f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{index}.1.")
        if level < levels - 1:
            index = (level + 1) * (per_level + 1)
            table.add(f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.")
    table.add("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET)
    table.add("mid_block.attentions.0.", "middle_block.1.")
    table.add("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)
    for level, block_type in enumerate(config["up_block_types"]):
        has_attention = "CrossAttn" in block_type
        for j in range(per_level + 1):
            index = level * (per_level + 1) + j
            table.add(f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{index}.0.", _UNET_RESNET)
            if has_attention:
                table.add(f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{index}.1.")
        if level < levels - 1:
            last = level * (per_level + 1) + per_level
            slot = 2 if has_attention else 1
            table.add(f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{last}.{slot}.conv.")
    return table


# ---------------------------------------------------------------------------------------------------------- VAE
_VAE_RESNET = {"norm1.": "norm1.", "conv1.": "conv1.", "norm2.": "norm2.", "conv2.": "conv2.",
               "conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_table(config: Mapping) -> KeyTable:
    """Rules for a diffusers ``AutoencoderKL`` config. LDM numbers decoder levels from the lowest resolution up
    (diffusers' ``up_blocks.0`` is LDM's ``up.<levels-1>``)."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    table = KeyTable()
    for part in ("encoder", "decoder"):
        table.add(f"{part}.conv_in.", f"{part}.conv_in.")
        table.add(f"{part}.conv_out.", f"{part}.conv_out.")
        table.add(f"{part}.conv_norm_out.", f"{part}.norm_out.")
        table.add(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET)
        table.add(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET)
        table.add(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION, as_conv=True)
    table.add("quant_conv.", "quant_conv.")
    table.add("post_quant_conv.", "post_quant_conv.")
    for level in range(levels):
        for j in range(per_level):
            table.add(f"encoder.down_blocks.{level}.resnets.{j}.", f"encoder.down.{level}.block.{j}.", _VAE_RESNET)
        ldm_up = levels - 1 - level
        for j in range(per_level + 1):
            table.add(f"decoder.up_blocks.{level}.resnets.{j}.", f"decoder.up.{ldm_up}.block.{j}.", _VAE_RESNET)
        if level < levels - 1:
            table.add(f"encoder.down_blocks.{level}.downsamplers.0.conv.", f"encoder.down.{level}.downsample.conv.")
            table.add(f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"decoder.up.{ldm_up}.upsample.conv.")
    return table


# ------------------------------------------------------------------------------------------------ text encoders
_OPENCLIP_LAYER = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                   "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
_QKV = ("q_proj", "k_proj", "v_proj")


def _strip_text_model(state: Mapping[str, torch.Tensor]) -> Tensors:
    """transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level; older ones with it. Normalise."""
    return {k[len(_HF_TEXT_MODEL):] if k.startswith(_HF_TEXT_MODEL) else k: v for k, v in state.items()}


def clip_l_to_original(state: Mapping[str, torch.Tensor]) -> Tensors:
    """CLIP ViT-L keeps the Hugging Face layout; the original file always nests it under ``text_model.``."""
    return {_HF_TEXT_MODEL + k: v for k, v in _strip_text_model(state).items()}


def clip_l_from_original(state: Mapping[str, torch.Tensor]) -> Tensors:
    bad = [k for k in state if not k.startswith(_HF_TEXT_MODEL)]
    if bad:
        raise KeyError(f"CLIP ViT-L: keys outside 'text_model.': {bad[:5]}")
    return _strip_text_model(state)


def _openclip_table(num_layers: int) -> KeyTable:
    table = KeyTable()
    table.add("embeddings.token_embedding.", "token_embedding.")
    table.add("final_layer_norm.", "ln_final.")
    for i in range(num_layers):
        table.add(f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", _OPENCLIP_LAYER)
    return table


def openclip_to_original(state: Mapping[str, torch.Tensor], num_layers: int) -> Tensors:
    """bigG from ``CLIPTextModelWithProjection`` to the OpenCLIP layout: q/k/v fused into ``attn.in_proj_*``, the
    position table as the bare ``positional_embedding``, ``text_projection`` transposed (OpenCLIP computes x @ P)."""
    state = _strip_text_model(state)
    rest: Tensors = {}
    out: Tensors = {}
    for key, tensor in state.items():
        if key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif ".self_attn." in key and key.split(".")[-2] in _QKV:
            continue  # fused below
        else:
            rest[key] = tensor
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            parts = [f"encoder.layers.{i}.self_attn.{p}.{kind}" for p in _QKV]
            missing = [p for p in parts if p not in state]
            if missing:
                raise KeyError(f"OpenCLIP bigG: missing {missing} for layer {i}")
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([state[p] for p in parts])
    fused = {k for k in state if ".self_attn." in k and k.split(".")[-2] in _QKV}
    expected_fused = {f"encoder.layers.{i}.self_attn.{p}.{kind}" for i in range(num_layers) for p in _QKV
                      for kind in ("weight", "bias")}
    if fused != expected_fused:
        raise KeyError(f"OpenCLIP bigG: q/k/v keys beyond {num_layers} layers: {sorted(fused - expected_fused)[:5]}")
    out.update(_openclip_table(num_layers).convert(rest, True, "OpenCLIP bigG"))
    return out


def openclip_from_original(state: Mapping[str, torch.Tensor], num_layers: int) -> Tensors:
    """Inverse of :func:`openclip_to_original`; keys without the ``text_model.`` level (see ``_strip_text_model``)."""
    out: Tensors = {}
    rest: Tensors = {}
    for key, tensor in state.items():
        if key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = tensor
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.T.contiguous()
        elif key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            layer = key.split(".")[2]
            if tensor.shape[0] % 3:
                raise ValueError(f"OpenCLIP bigG: {key!r} has {tensor.shape[0]} rows, not 3 equal q/k/v parts")
            kind = "weight" if key.endswith("weight") else "bias"
            for name, chunk in zip(_QKV, tensor.chunk(3, dim=0)):
                out[f"encoder.layers.{layer}.self_attn.{name}.{kind}"] = chunk.contiguous()
        else:
            rest[key] = tensor
    out.update(_openclip_table(num_layers).convert(rest, False, "OpenCLIP bigG"))
    return out


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
        if name is None or key.endswith(_IGNORED_SUFFIXES):
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
    return {(k if k in expected or _HF_TEXT_MODEL + k not in expected else _HF_TEXT_MODEL + k): v
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
