"""Presets: the paper's sizes exactly (meta device), and a tiny twin with the same structure."""

from __future__ import annotations

import dataclasses

import pytest

from sdxl.models import build_on_meta, count_parameters
from sdxl.presets import (
    CLIP_VOCAB_SIZE,
    FOURIER_DIM,
    PAPER_BASE_UNET_PARAMS,
    PAPER_TEXT_ENCODER_PARAMS,
    get_preset,
)


@pytest.fixture(scope="module")
def full_meta():
    return build_on_meta("full")


@pytest.fixture(scope="module")
def tiny_meta():
    return build_on_meta("tiny")


def test_unknown_preset_names_the_parameter():
    with pytest.raises(ValueError, match="preset") as info:
        get_preset("huge")
    assert "huge" in str(info.value) and "tiny" in str(info.value)


def test_full_base_unet_has_the_public_parameter_count(full_meta):
    assert count_parameters(full_meta["unet_base"]) == PAPER_BASE_UNET_PARAMS == 2_567_463_684
    assert next(full_meta["unet_base"].parameters()).device.type == "meta"


def test_full_text_encoders_are_about_817m(full_meta):
    total = count_parameters(full_meta["text_encoder_l"]) + count_parameters(full_meta["text_encoder_g"])
    assert abs(total - PAPER_TEXT_ENCODER_PARAMS) / PAPER_TEXT_ENCODER_PARAMS < 0.01


def test_full_base_matches_table_1():
    cfg = get_preset("full").unet_base
    assert cfg["block_out_channels"] == [320, 640, 1280]
    assert cfg["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert cfg["transformer_layers_per_block"] == [1, 2, 10]
    assert cfg["cross_attention_dim"] == 2048 == 768 + 1280
    assert cfg["projection_class_embeddings_input_dim"] == 2816 == 1280 + 6 * 256
    assert cfg["addition_embed_type"] == "text_time" and cfg["addition_time_embed_dim"] == 256


def test_full_refiner_matches_the_public_refiner(full_meta):
    cfg = get_preset("full").unet_refiner
    assert cfg["block_out_channels"] == [384, 768, 1536, 1536]
    assert cfg["attention_head_dim"] == [6, 12, 24, 24]
    assert cfg["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    unet = full_meta["unet_refiner"]
    # 4 transformer blocks at the two middle levels only
    depths = [len(block.attentions[0].transformer_blocks) if hasattr(block, "attentions") else 0
              for block in unet.down_blocks]
    assert depths == [0, 4, 4, 0]
    assert unet.add_embedding.linear_1.in_features == 2560 == 1280 + 5 * 256
    assert unet.config.cross_attention_dim == 1280
    assert 2.2e9 < count_parameters(unet) < 2.4e9


def test_full_vae_is_the_sdxl_autoencoder(full_meta):
    preset = get_preset("full")
    assert preset.vae["block_out_channels"] == [128, 256, 512, 512]
    assert preset.vae_scale_factor == preset.vae["scaling_factor"] == 0.13025
    assert preset.vae_downsample == 8 and preset.latent_channels == 4
    assert full_meta["vae"].config.sample_size == 1024


def test_full_text_encoder_shapes():
    preset = get_preset("full")
    text_l, text_g = preset.text_encoder_l, preset.text_encoder_g
    assert (text_l["hidden_size"], text_l["num_hidden_layers"], text_l["num_attention_heads"],
            text_l["intermediate_size"], text_l["hidden_act"]) == (768, 12, 12, 3072, "quick_gelu")
    assert (text_g["hidden_size"], text_g["num_hidden_layers"], text_g["num_attention_heads"],
            text_g["intermediate_size"], text_g["hidden_act"], text_g["projection_dim"]) == (
        1280, 32, 20, 5120, "gelu", 1280)


def test_tiny_is_a_few_million_parameters(tiny_meta):
    total = sum(count_parameters(m) for m in tiny_meta.values())
    assert 1_000_000 < total < 15_000_000


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_tiny_keeps_the_full_structure(kind):
    full, tiny = get_preset("full"), get_preset("tiny")
    full_unet, tiny_unet = full.unet_config(kind), tiny.unet_config(kind)
    for key in ("down_block_types", "up_block_types", "mid_block_type", "addition_embed_type",
                "addition_time_embed_dim", "use_linear_projection", "in_channels", "out_channels", "layers_per_block"):
        assert tiny_unet[key] == full_unet[key], key
    assert len(tiny_unet["block_out_channels"]) == len(full_unet["block_out_channels"])
    # The tiny VAE has three levels (4x down; docs/decisions.md "The tiny recipe"), the full one SDXL's four.
    assert tiny.vae_downsample == 4 and len(tiny.vae["down_block_types"]) == 3
    assert tiny.vae_scale_factor == full.vae_scale_factor
    assert tiny.text_encoder_l["vocab_size"] == tiny.text_encoder_g["vocab_size"] == CLIP_VOCAB_SIZE
    assert tiny.text_encoder_l["hidden_act"] == "quick_gelu" and tiny.text_encoder_g["hidden_act"] == "gelu"


def test_tiny_dims_follow_from_its_encoders(tiny_meta):
    tiny = get_preset("tiny")
    assert tiny.unet_base["cross_attention_dim"] == tiny.text_encoder_l["hidden_size"] + tiny.text_encoder_g[
        "hidden_size"] == tiny.context_dim_base
    assert tiny.unet_refiner["cross_attention_dim"] == tiny.context_dim_refiner == tiny.text_encoder_g["hidden_size"]
    assert tiny.unet_base["projection_class_embeddings_input_dim"] == tiny.pooled_dim + 6 * FOURIER_DIM
    assert tiny.unet_refiner["projection_class_embeddings_input_dim"] == tiny.pooled_dim + 5 * FOURIER_DIM
    assert tiny_meta["unet_base"].add_embedding.linear_1.in_features == tiny.pooled_dim + 6 * FOURIER_DIM


def test_get_preset_hands_out_private_copies():
    first = get_preset("tiny")
    first.unet_base["block_out_channels"].append(999)
    assert get_preset("tiny").unet_base["block_out_channels"][-1] != 999
    custom = dataclasses.replace(get_preset("tiny"), name="custom")
    assert get_preset(custom).name == "custom"
    with pytest.raises(ValueError, match="kind"):
        get_preset("tiny").unet_config("middle")


def test_vae_config_widens_the_autoencoder_but_keeps_its_latent_grid():
    preset = get_preset("tiny")
    wide = preset.vae_config([32, 64, 64], layers_per_block=2)
    assert wide["block_out_channels"] == [32, 64, 64] and wide["layers_per_block"] == 2
    assert preset.vae["block_out_channels"] == [16, 32, 32]  # the preset itself is untouched
    assert preset.vae_mismatch(wide) is None
    assert preset.vae_config() == preset.vae
    with pytest.raises(ValueError, match="3 levels"):
        preset.vae_config([32, 64, 64, 64])
    with pytest.raises(ValueError, match="norm groups"):
        preset.vae_config([30, 64, 64])
    with pytest.raises(ValueError, match="layers_per_block"):
        preset.vae_config(layers_per_block=0)
    # what does not fit: another latent grid (the full preset's 8x) or other latent channels
    assert "8x" in preset.vae_mismatch(get_preset("full").vae)
    assert "latent_channels" in preset.vae_mismatch(dict(preset.vae, latent_channels=16))
    from sdxl.models import build_vae
    assert list(build_vae(preset, config=wide).config.block_out_channels) == [32, 64, 64]
    with pytest.raises(ValueError, match="does not fit preset 'tiny'"):
        build_vae(preset, config=get_preset("full").vae)


def test_micro_is_tiny_with_one_block_per_unet_level():
    """The learning check's preset: tiny's structure and every other component, fewer blocks per UNet level."""
    tiny, micro = get_preset("tiny"), get_preset("micro")
    assert micro.name == "micro"
    for kind in ("base", "refiner"):
        t, m = tiny.unet_config(kind), micro.unet_config(kind)
        assert m["layers_per_block"] == 1 and t["layers_per_block"] == 2
        assert {k: v for k, v in m.items() if k not in ("layers_per_block", "transformer_layers_per_block")} == {
            k: v for k, v in t.items() if k not in ("layers_per_block", "transformer_layers_per_block")}
    assert micro.unet_base["transformer_layers_per_block"] == [1, 1, 1]
    assert (micro.vae, micro.text_encoder_l, micro.text_encoder_g) == (tiny.vae, tiny.text_encoder_l,
                                                                        tiny.text_encoder_g)
    assert micro.clip_l_embedding_std == tiny.clip_l_embedding_std
    assert micro.context_dim_base == tiny.context_dim_base and micro.pooled_dim == tiny.pooled_dim
