"""Component builders: random init (seeded, isolated RNG), meta device, diffusers folders, model_summary stage."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from omegaconf import OmegaConf

from sdxl.models import (
    SDXLComponents,
    build_components,
    build_text_encoder_g,
    build_text_encoder_l,
    build_unet,
    count_parameters,
)
from sdxl.presets import get_preset


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


@pytest.fixture(scope="module")
def both(cache_dir) -> SDXLComponents:
    return build_components("tiny", kind="both", tokenizer_cache=cache_dir)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_components_fit_together(both):
    preset = get_preset("tiny")
    assert both.unet.config.cross_attention_dim == preset.context_dim_base
    assert both.refiner_unet.config.cross_attention_dim == preset.context_dim_refiner
    assert both.text_encoder_l.config.hidden_size + both.text_encoder_g.config.hidden_size == preset.context_dim_base
    assert both.text_encoder_g.config.projection_dim == preset.pooled_dim
    assert len(both.tokenizer_l) == len(both.tokenizer_g) == 49408
    assert not any(p.requires_grad for p in both.text_encoder_g.parameters())
    assert not both.unet.training and not both.vae.training
    latents = both.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)  # the tiny VAE downsamples by 4 (full: 8)


def test_unets_use_sdpa_attention(both):
    processors = list(both.unet.attn_processors.values()) + list(both.refiner_unet.attn_processors.values())
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_vae_stays_float32_whatever_the_dtype(cache_dir):
    comps = build_components("tiny", kind="base", dtype=torch.bfloat16, tokenizer_cache=cache_dir)
    assert next(comps.unet.parameters()).dtype == torch.bfloat16
    assert next(comps.text_encoder_l.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in comps.vae.parameters())
    assert comps.refiner_unet is None


def test_random_init_is_seeded_and_leaves_the_global_rng_alone(both):
    state = torch.random.get_rng_state()
    again = build_unet("tiny", "base", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(again, both.unet)
    assert not _same_weights(build_unet("tiny", "base", seed=1), both.unet)


def test_random_clip_l_draws_its_embeddings_at_the_preset_std():
    """The tiny preset's random CLIP-L gets token and position embeddings of std 0.5 (CLIP's init is 0.02, which
    the random layers' mixing drowns); bigG and every other weight keep CLIP's init, and the draw is seeded."""
    tiny = get_preset("tiny")
    assert tiny.clip_l_embedding_std == 0.5 and get_preset("full").clip_l_embedding_std is None

    def embedding_stds(encoder) -> list[float]:
        return [float(module.weight.detach().std()) for name, module in encoder.named_modules()
                if name.endswith(("token_embedding", "position_embedding"))]

    clip_l = build_text_encoder_l(tiny, seed=3)
    assert [round(std, 1) for std in embedding_stds(clip_l)] == [0.5, 0.5]
    assert _same_weights(build_text_encoder_l(tiny, seed=3), clip_l)
    clip_init = dataclasses.replace(tiny, clip_l_embedding_std=None)
    assert all(std < 0.03 for std in embedding_stds(build_text_encoder_l(clip_init, seed=3)))
    assert all(std < 0.03 for std in embedding_stds(build_text_encoder_g(tiny, seed=3)))
    # only the embeddings differ from CLIP's init
    redrawn, clip = clip_l.state_dict(), build_text_encoder_l(clip_init, seed=3).state_dict()
    differing = {k for k in redrawn if not torch.equal(redrawn[k], clip[k])}
    assert differing and all(k.endswith(("token_embedding.weight", "position_embedding.weight")) for k in differing)


def test_meta_device_builds_have_no_storage():
    unet = build_unet("full", "base", device="meta")
    assert all(p.is_meta for p in unet.parameters())
    assert count_parameters(unet) == 2_567_463_684


def test_refiner_alone_has_no_clip_l(cache_dir):
    comps = build_components("tiny", kind="refiner", tokenizer_cache=cache_dir)
    assert comps.unet is None and comps.text_encoder_l is None and comps.tokenizer_l is None
    assert comps.refiner_unet is not None and comps.tokenizer_g.pad_token_id == 0


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="kind"):
        build_components("tiny", kind="upscaler")
    with pytest.raises(ValueError, match="preset"):
        build_components("medium")


def _save_diffusers_folder(comps: SDXLComponents, folder, refiner: bool = False) -> str:
    (comps.refiner_unet if refiner else comps.unet).save_pretrained(str(folder / "unet"))
    comps.vae.save_pretrained(str(folder / "vae"))
    comps.text_encoder_g.save_pretrained(str(folder / "text_encoder_2"))
    comps.tokenizer_g.save_pretrained(str(folder / "tokenizer_2"))
    if not refiner:
        comps.text_encoder_l.save_pretrained(str(folder / "text_encoder"))
        comps.tokenizer_l.save_pretrained(str(folder / "tokenizer"))
    return str(folder)


def test_diffusers_folders_load_back_identically(both, tmp_path, cache_dir):
    base_dir = _save_diffusers_folder(both, tmp_path / "base")
    refiner_dir = _save_diffusers_folder(both, tmp_path / "refiner", refiner=True)
    loaded = build_components("tiny", kind="both", pretrained=base_dir, pretrained_refiner=refiner_dir, seed=99,
                              tokenizer_cache=cache_dir)
    for name in ("unet", "refiner_unet", "vae", "text_encoder_l", "text_encoder_g"):
        assert _same_weights(getattr(loaded, name), getattr(both, name)), name
    ids = loaded.tokenizer_l(["a red cube"], padding="max_length", max_length=77).input_ids
    assert ids == both.tokenizer_l(["a red cube"], padding="max_length", max_length=77).input_ids
    assert loaded.tokenizer_g.pad_token_id == 0
    # The loaded text encoder computes what the original does.
    tokens = torch.tensor(ids)
    with torch.no_grad():
        assert torch.allclose(loaded.text_encoder_g(tokens).text_embeds, both.text_encoder_g(tokens).text_embeds)
    refiner_only = build_components("tiny", kind="refiner", pretrained_refiner=refiner_dir, seed=5)
    assert _same_weights(refiner_only.refiner_unet, both.refiner_unet)
    assert _same_weights(refiner_only.text_encoder_g, both.text_encoder_g)


def test_pretrained_weights_of_another_size_are_refused(both, tmp_path):
    folder = _save_diffusers_folder(both, tmp_path / "base")
    tiny = get_preset("tiny")
    other = dataclasses.replace(tiny, name="other", unet_base={**tiny.unet_base, "cross_attention_dim": 2048})
    with pytest.raises(ValueError, match="cross_attention_dim") as info:
        build_components(other, kind="base", pretrained=folder)
    assert folder in str(info.value) and "model.preset" in str(info.value)


def test_model_summary_stage(make_ctx, capsys):
    from stages.model_summary import run

    full = run(OmegaConf.create({"model": {"preset": "full"}}), make_ctx("model_summary"))
    assert full["parameters"]["unet_base"] == 2_567_463_684
    assert abs(full["parameters"]["text_encoders_total"] - 817e6) / 817e6 < 0.01
    assert full["parameters"]["text_encoders_total"] == (
        full["parameters"]["text_encoder_l"] + full["parameters"]["text_encoder_g"])
    printed = capsys.readouterr().out
    assert "2,567,463,684" in printed and "817M" in printed and "refiner UNet" in printed
    tiny = run(OmegaConf.create({"model": {"preset": "tiny"}}), make_ctx("model_summary"))
    assert sum(v for k, v in tiny["parameters"].items() if k != "text_encoders_total") < 15_000_000
    with pytest.raises(ValueError, match="preset"):
        run(OmegaConf.create({"model": {"preset": "xl"}}), make_ctx("model_summary"))
