"""The key tables of single-file SDXL checkpoints: our (diffusers / transformers) names against the original
(Stability ``sgm``, LDM, OpenCLIP) ones, as name-prefix rules derived from the module configs and applied by
longest-prefix match in either direction. ``sdxl.single_file`` reads and writes whole files with them; the layout
is described there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
HF_TEXT_MODEL = "text_model."
# Entries some original checkpoints carry that hold no weights of ours (open_clip's contrastive temperature, the
# position-id buffer older transformers saved): accepted and skipped on load.
IGNORED_SUFFIXES = ("logit_scale", "position_ids")

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
    return {k[len(HF_TEXT_MODEL):] if k.startswith(HF_TEXT_MODEL) else k: v for k, v in state.items()}


def clip_l_to_original(state: Mapping[str, torch.Tensor]) -> Tensors:
    """CLIP ViT-L keeps the Hugging Face layout; the original file always nests it under ``text_model.``."""
    return {HF_TEXT_MODEL + k: v for k, v in _strip_text_model(state).items()}


def clip_l_from_original(state: Mapping[str, torch.Tensor]) -> Tensors:
    bad = [k for k in state if not k.startswith(HF_TEXT_MODEL)]
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
