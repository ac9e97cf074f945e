"""Forward FLOPs of the SDXL components, counted by ``torch.utils.flop_counter.FlopCounterMode`` on meta-device models.

Nothing is computed: the models are built on the meta device (``sdxl.models.build_on_meta``) and the counter adds up the FLOPs of every matmul, convolution and attention op a forward pass
dispatches, from shapes alone (a multiply-add counts 2, the convention GPU peak figures use). The docs' scale model
(benchmarks/bench_scale_model.py) and the GPU check's MFU (benchmarks/gpu_check.py) both take their FLOPs from here.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdxl.latent_scale import vae_downsample

META = torch.device("meta")
CLIP_TOKENS = 77
SCORER_ARCH = "ViT-L-14"  # the CLIP the filter stage's LAION aesthetic scorer embeds images with
SCORER_IMAGE_SIZE = 224


def count_flops(forward: Callable[[], object]) -> int:
    """FLOPs of everything ``forward()`` dispatches (no gradients are taken)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=2)
def _meta_parts(preset: str) -> dict:
    from sdxl.models import build_on_meta

    return build_on_meta(preset)


def unet_inputs(preset: str, kind: str, resolution: int, batch: int = 1, device=META,
                dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of one UNet forward at ``resolution``² pixels: latents, timesteps, a 77-token context and
    the vector conditioning of ``kind`` (base: pooled + 6 time ids; refiner: pooled + 5)."""
    from sdxl.presets import BASE_NUM_TIME_IDS, REFINER_NUM_TIME_IDS, get_preset

    spec = get_preset(preset)
    side = resolution // spec.vae_downsample
    context_dim = spec.context_dim_base if kind == "base" else spec.context_dim_refiner
    time_ids = BASE_NUM_TIME_IDS if kind == "base" else REFINER_NUM_TIME_IDS
    return {
        "sample": torch.zeros(batch, spec.latent_channels, side, side, device=device, dtype=dtype),
        "timestep": torch.zeros(batch, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.zeros(batch, CLIP_TOKENS, context_dim, device=device, dtype=dtype),
        "added_cond_kwargs": {"text_embeds": torch.zeros(batch, spec.pooled_dim, device=device, dtype=dtype),
                              "time_ids": torch.zeros(batch, time_ids, device=device, dtype=torch.float32)},
    }


@functools.lru_cache(maxsize=32)
def unet_forward_flops(preset: str, kind: str, resolution: int) -> int:
    """FLOPs of one ``kind`` ("base" | "refiner") UNet forward for one sample at ``resolution``² pixels."""
    unet = _meta_parts(preset)[f"unet_{kind}"]
    inputs = unet_inputs(preset, kind, resolution)
    return count_flops(lambda: unet(**inputs, return_dict=False))


@functools.lru_cache(maxsize=16)
def vae_flops(preset: str, resolution: int, part: str) -> int:
    """FLOPs of the VAE ``part`` ("encode" | "decode") for one image at ``resolution``² pixels."""
    vae = _meta_parts(preset)["vae"]
    if part == "encode":
        pixels = torch.zeros(1, 3, resolution, resolution, device=META)
        return count_flops(lambda: vae.encode(pixels))
    if part == "decode":
        side = resolution // vae_downsample(vae)
        latents = torch.zeros(1, vae.config.latent_channels, side, side, device=META)
        return count_flops(lambda: vae.decode(latents))
    raise ValueError(f"part must be 'encode' or 'decode', got {part!r}")


@functools.lru_cache(maxsize=4)
def text_encoders_flops(preset: str) -> int:
    """FLOPs of both text encoders (CLIP ViT-L/14 and OpenCLIP bigG/14 text towers) over one 77-token caption."""
    parts = _meta_parts(preset)
    ids = torch.zeros(1, CLIP_TOKENS, dtype=torch.long, device=META)

    def forward():
        parts["text_encoder_l"](ids, output_hidden_states=True)
        parts["text_encoder_g"](ids, output_hidden_states=True)

    return count_flops(forward)


@functools.lru_cache(maxsize=1)
def scorer_image_flops() -> int:
    """FLOPs of one CLIP ViT-L/14 image embedding at 224² (the filter's CLIP / aesthetic scores)."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    config = open_clip.get_model_config(SCORER_ARCH)
    with META:
        model = CLIP(embed_dim=config["embed_dim"], vision_cfg=CLIPVisionCfg(**config["vision_cfg"]),
                     text_cfg=CLIPTextCfg(**config["text_cfg"]))
    images = torch.zeros(1, 3, SCORER_IMAGE_SIZE, SCORER_IMAGE_SIZE, device=META)
    return count_flops(lambda: model.encode_image(images))


def parameter_counts(preset: str) -> dict[str, int]:
    """Parameters per component of ``preset`` (meta device)."""
    from sdxl.models import count_parameters

    return {name: count_parameters(module) for name, module in _meta_parts(preset).items()}
