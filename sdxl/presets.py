"""Model sizes: the paper's SDXL (``full``), a toy twin with the same structure (``tiny``), and ``micro``, tiny with
one block per UNet level, for the suite's learning check.

Each preset holds plain config dicts for the classes we build on: diffusers ``UNet2DConditionModel`` (base and
refiner), diffusers ``AutoencoderKL`` and transformers ``CLIPTextConfig`` (CLIP ViT-L/14 text as ``CLIPTextModel``,
OpenCLIP ViT-bigG/14 text as ``CLIPTextModelWithProjection``). The ``full`` dicts match the public
``stable-diffusion-xl-base-1.0`` / ``-refiner-1.0`` configs (SDXL Table 1, Sec. 2.1), so public weights load into
them. ``tiny`` keeps every structural choice (3 UNet levels without attention at the highest resolution, ``text_time``
vector conditioning with 256-dim Fourier features, an 8x-downsampling VAE, the real 49408-token vocabulary) at toy
widths, so that code paths are identical and only the numbers shrink.

Note: diffusers' ``attention_head_dim`` on ``UNet2DConditionModel`` is, for historical reasons, the number of heads
per level (SDXL: 64-channel heads, so 320/64 = 5 heads, and so on).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

CLIP_VOCAB_SIZE = 49408  # the CLIP BPE vocabulary shared by both text encoders
TOKENIZER_MAX_LENGTH = 77
FOURIER_DIM = 256  # per micro-conditioning scalar (Sec. 2.2)
BASE_NUM_TIME_IDS = 6  # orig_h, orig_w, crop_top, crop_left, target_h, target_w
REFINER_NUM_TIME_IDS = 5  # orig_h, orig_w, crop_top, crop_left, aesthetic_score
SDXL_VAE_SCALE_FACTOR = 0.13025

# Figures the paper / public release state, shown beside our counts by the model_summary stage.
PAPER_BASE_UNET_PARAMS = 2_567_463_684
PAPER_TEXT_ENCODER_PARAMS = 817_000_000  # "817M" (Table 1)


@dataclass(frozen=True)
class ModelPreset:
    """Configs of every SDXL component at one size. Get one with :func:`get_preset` (a private copy each call)."""

    name: str
    unet_base: dict
    unet_refiner: dict
    vae: dict
    text_encoder_l: dict
    text_encoder_g: dict
    vae_scale_factor: float = SDXL_VAE_SCALE_FACTOR
    tokenizer_max_length: int = TOKENIZER_MAX_LENGTH
    # Std of the token and position embeddings of a *randomly initialised* CLIP-L text encoder; None keeps CLIP's
    # init (0.02). bigG always keeps CLIP's init, and pretrained encoders keep their weights whatever this says.
    clip_l_embedding_std: float | None = None

    def unet_config(self, kind: str) -> dict:
        if kind == "base":
            return self.unet_base
        if kind == "refiner":
            return self.unet_refiner
        raise ValueError(f"kind must be 'base' or 'refiner', got {kind!r}")

    @property
    def context_dim_base(self) -> int:
        """Cross-attention width of the base: CLIP-L hidden ‖ bigG hidden (2048 at full)."""
        return self.text_encoder_l["hidden_size"] + self.text_encoder_g["hidden_size"]

    @property
    def context_dim_refiner(self) -> int:
        """Cross-attention width of the refiner: bigG hidden only (1280 at full)."""
        return self.text_encoder_g["hidden_size"]

    @property
    def pooled_dim(self) -> int:
        """Width of bigG's projected pooled embedding (1280 at full)."""
        return self.text_encoder_g["projection_dim"]

    @property
    def latent_channels(self) -> int:
        return self.vae["latent_channels"]

    @property
    def vae_downsample(self) -> int:
        """Pixels per latent along a side: 2 per VAE level after the first (8 at full, 4 at tiny)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def vae_config(self, block_out_channels=None, layers_per_block=None) -> dict:
        """The preset's autoencoder config, optionally wider / deeper. The number of levels and the latent channels
        stay the preset's, so the latents keep their grid and every diffusion model of the preset fits them."""
        config = copy.deepcopy(self.vae)
        if block_out_channels is not None:
            widths = [int(c) for c in block_out_channels]
            levels, groups = len(config["block_out_channels"]), int(config["norm_num_groups"])
            if len(widths) != levels:
                raise ValueError(f"the {self.name} preset's autoencoder has {levels} levels (its latent grid); "
                                 f"got {len(widths)} widths {widths}")
            if any(w < groups or w % groups for w in widths):
                raise ValueError(f"autoencoder widths must be multiples of its {groups} norm groups, got {widths}")
            config["block_out_channels"] = widths
        if layers_per_block is not None:
            if int(layers_per_block) < 1:
                raise ValueError(f"autoencoder layers_per_block must be >= 1, got {layers_per_block}")
            config["layers_per_block"] = int(layers_per_block)
        return config

    def vae_mismatch(self, config: dict) -> str | None:
        """Why an autoencoder ``config`` cannot serve this preset's diffusion models (other latent channels or
        another latent grid), or None. Its widths and depth are its own (``train.vae.block_out_channels``)."""
        channels, levels = config.get("latent_channels"), len(config.get("block_out_channels") or ())
        want_levels = len(self.vae["block_out_channels"])
        if channels != self.latent_channels:
            return f"latent_channels={channels!r} (expected {self.latent_channels})"
        if levels != want_levels:
            return (f"{levels} levels, i.e. {2 ** max(levels - 1, 0)}x downsampling (expected {want_levels} levels, "
                    f"{self.vae_downsample}x)")
        return None


def _unet(*, channels, heads, layers, context_dim, pooled_dim, kind, sample_size, norm_groups) -> dict:
    """A UNet2DConditionModel config; ``kind`` picks the SDXL base or refiner block layout."""
    if kind == "base":
        # Highest resolution without attention, then two cross-attention levels (Table 1: [0, 2, 10]).
        down = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        up = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
        num_time_ids = BASE_NUM_TIME_IDS
    else:
        # Refiner: four levels, attention only at the two middle ones.
        down = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        up = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
        num_time_ids = REFINER_NUM_TIME_IDS
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "only_cross_attention": False,
        "block_out_channels": list(channels),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": layers,
        "attention_head_dim": list(heads),
        "use_linear_projection": True,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": FOURIER_DIM,
        "projection_class_embeddings_input_dim": pooled_dim + num_time_ids * FOURIER_DIM,
    }


def _vae(channels, *, layers_per_block, norm_groups, sample_size) -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": layers_per_block,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": norm_groups,
        "sample_size": sample_size,
        "scaling_factor": SDXL_VAE_SCALE_FACTOR,
        "force_upcast": True,
    }


def _text(*, hidden, layers, heads, intermediate, act, projection) -> dict:
    # bos/eos/pad ids as in the public SDXL configs: eos_token_id=2 makes transformers pool at the argmax token id,
    # i.e. the first <|endoftext|> (49407, the largest id), whichever pad token the tokenizer uses.
    return {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "projection_dim": projection,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": TOKENIZER_MAX_LENGTH,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _full() -> ModelPreset:
    text_l = _text(hidden=768, layers=12, heads=12, intermediate=3072, act="quick_gelu", projection=768)
    text_g = _text(hidden=1280, layers=32, heads=20, intermediate=5120, act="gelu", projection=1280)
    return ModelPreset(
        name="full",
        unet_base=_unet(channels=[320, 640, 1280], heads=[5, 10, 20], layers=[1, 2, 10], context_dim=768 + 1280,
                        pooled_dim=1280, kind="base", sample_size=128, norm_groups=32),
        unet_refiner=_unet(channels=[384, 768, 1536, 1536], heads=[6, 12, 24, 24], layers=4, context_dim=1280,
                           pooled_dim=1280, kind="refiner", sample_size=128, norm_groups=32),
        vae=_vae([128, 256, 512, 512], layers_per_block=2, norm_groups=32, sample_size=1024),
        text_encoder_l=text_l,
        text_encoder_g=text_g,
    )


def _tiny() -> ModelPreset:
    # Hidden sizes 32 (L) and 64 (G): context 96, pooled 64. Most parameters are the 49408-token embeddings.
    text_l = _text(hidden=32, layers=2, heads=2, intermediate=64, act="quick_gelu", projection=32)
    text_g = _text(hidden=64, layers=2, heads=4, intermediate=128, act="gelu", projection=64)
    return ModelPreset(
        name="tiny",
        unet_base=_unet(channels=[32, 64, 64], heads=[2, 4, 4], layers=[1, 1, 2], context_dim=32 + 64,
                        pooled_dim=64, kind="base", sample_size=32, norm_groups=8),
        unet_refiner=_unet(channels=[32, 64, 64, 64], heads=[2, 4, 4, 4], layers=1, context_dim=64,
                           pooled_dim=64, kind="refiner", sample_size=32, norm_groups=8),
        # Three levels (4x down, LDM's KL-f4 layout) instead of SDXL's four (8x): at the tiny sizes (64 px) an 8x
        # latent is 8x8 and its 4 channels could not keep the demo objects' colours; docs/decisions.md.
        vae=_vae([16, 32, 32], layers_per_block=1, norm_groups=4, sample_size=64),
        text_encoder_l=text_l,
        text_encoder_g=text_g,
        # A random 2-layer encoder with CLIP's 0.02 embeddings buries each token under its random mixing of the
        # others (std ~0.5); at 0.5 CLIP-L's tokens survive into the context. bigG keeps CLIP's init: its pooled
        # output, the prompt mixed into one vector, then still carries the object's colour (docs/decisions.md,
        # 2026-12-01: the demo's base scored colour 0.40 / background 0.90 this way, 0.16 / 0.95 with both at 0.5).
        clip_l_embedding_std=0.5,
    )


def _micro() -> ModelPreset:
    # tiny with one ResNet and one transformer block per UNet level (tiny: two ResNets, [1, 1, 2] transformers).
    # At the learning check's size (batch 16, 8x8 latents) a step is a fixed cost per module call, so this base
    # trains a step ~1.9x faster; autoencoder and text encoders are tiny's (docs/decisions.md, 2026-12-05 05:30 UTC).
    tiny = _tiny()
    unet_base = dict(tiny.unet_base, layers_per_block=1, transformer_layers_per_block=[1, 1, 1])
    unet_refiner = dict(tiny.unet_refiner, layers_per_block=1)
    return replace(tiny, name="micro", unet_base=unet_base, unet_refiner=unet_refiner)


_PRESETS = {"full": _full, "tiny": _tiny, "micro": _micro}
PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str | ModelPreset) -> ModelPreset:
    """The preset called ``name`` (``full``, ``tiny`` or ``micro``); a ModelPreset passes through as a private copy."""
    if isinstance(name, ModelPreset):
        return copy.deepcopy(name)
    if name not in _PRESETS:
        raise ValueError(f"preset must be one of {list(PRESET_NAMES)}, got {name!r}")
    return _PRESETS[name]()
