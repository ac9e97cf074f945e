"""Single-file SDXL checkpoints: our mapping round-trips exactly, matches the original SDXL key layout, and
diffusers' own single-file converter (an independent implementation) reads our files into the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl.diffusers_folder import write_pipeline_folder
from sdxl.models import build_components
from sdxl.single_file import (detect_kind, load_single_file, save_single_file, to_original_state_dict,
                              unet_table)


@pytest.fixture(scope="module")
def comps(tiny_components):
    return tiny_components


@pytest.fixture(scope="module")
def other_comps():
    """Differently seeded modules: their folder gives diffusers the configs but none of the weights we compare."""
    return build_components("tiny", kind="both", seed=123)


def _modules(comps, kind: str) -> dict:
    mods = {"unet": comps.unet if kind == "base" else comps.refiner_unet, "vae": comps.vae,
            "text_encoder_2": comps.text_encoder_g}
    if kind == "base":
        mods["text_encoder"] = comps.text_encoder_l
    return mods


def _save(comps, kind: str, path: str) -> dict:
    mods = _modules(comps, kind)
    return save_single_file(path, kind, mods["unet"], mods["vae"], mods["text_encoder_2"], mods.get("text_encoder"))


def _assert_same_weights(ours: dict, theirs: dict) -> None:
    for name, module in ours.items():
        expected, got = module.state_dict(), theirs[name].state_dict()
        assert set(got) == set(expected), f"{name}: keys differ: {sorted(set(got) ^ set(expected))[:5]}"
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"{name}: {len(different)} tensors differ, first {different[:3]}"


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_round_trip_is_exact_and_drops_nothing(comps, kind, tmp_path):
    path = str(tmp_path / f"{kind}.safetensors")
    summary = _save(comps, kind, path)
    mods = _modules(comps, kind)
    loaded = load_single_file(path, "tiny")
    assert set(loaded) == set(mods)
    _assert_same_weights(mods, loaded)
    # Nothing dropped or invented: every parameter element is in the file exactly once. (The only change in the
    # key count is bigG's q/k/v: 6 tensors per layer fused into in_proj_weight/bias.)
    state_size = sum(len(m.state_dict()) for m in mods.values())
    layers_g = comps.text_encoder_g.config.num_hidden_layers
    assert summary["num_tensors"] == state_size - 4 * layers_g
    assert summary["num_parameters"] == sum(t.numel() for m in mods.values() for t in m.state_dict().values())
    assert detect_kind(load_file(path).keys()) == kind


def test_base_file_uses_the_original_sdxl_key_layout(comps, tmp_path):
    path = str(tmp_path / "base.safetensors")
    _save(comps, "base", path)
    state = load_file(path)
    unet = comps.unet.state_dict()
    d = "model.diffusion_model."
    # sgm UNet naming; level 0 has no attention, so its upsampler (last up level) sits at index 1 there.
    assert torch.equal(state[d + "label_emb.0.0.weight"], unet["add_embedding.linear_1.weight"])
    assert torch.equal(state[d + "label_emb.0.2.bias"], unet["add_embedding.linear_2.bias"])
    assert torch.equal(state[d + "time_embed.2.weight"], unet["time_embedding.linear_2.weight"])
    assert torch.equal(state[d + "out.2.weight"], unet["conv_out.weight"])
    assert torch.equal(state[d + "input_blocks.1.0.in_layers.2.weight"], unet["down_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(state[d + "input_blocks.3.0.op.weight"], unet["down_blocks.0.downsamplers.0.conv.weight"])
    assert torch.equal(state[d + "input_blocks.4.1.proj_in.weight"], unet["down_blocks.1.attentions.0.proj_in.weight"])
    assert torch.equal(state[d + "middle_block.2.emb_layers.1.weight"],
                       unet["mid_block.resnets.1.time_emb_proj.weight"])
    assert torch.equal(state[d + "output_blocks.2.2.conv.weight"], unet["up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(state[d + "output_blocks.5.2.conv.weight"], unet["up_blocks.1.upsamplers.0.conv.weight"])
    assert torch.equal(state[d + "input_blocks.4.0.skip_connection.weight"],
                       unet["down_blocks.1.resnets.0.conv_shortcut.weight"])
    # LDM VAE naming: mid attention as 1x1 convolutions, decoder levels numbered from the lowest resolution.
    vae = comps.vae.state_dict()
    q = state["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (*vae["encoder.mid_block.attentions.0.to_q.weight"].shape, 1, 1)
    assert torch.equal(q[:, :, 0, 0], vae["encoder.mid_block.attentions.0.to_q.weight"])
    assert "first_stage_model.decoder.mid.attn_1.proj_out.weight" in state
    top = len(comps.vae.config.block_out_channels) - 1  # diffusers' up_blocks.0 is LDM's up.<levels-1>
    assert torch.equal(state[f"first_stage_model.decoder.up.{top}.block.0.conv1.weight"],
                       vae["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in state
    # CLIP-L in Hugging Face layout under text_model.; bigG in OpenCLIP layout.
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in state
    g = comps.text_encoder_g.state_dict()
    bigg = "conditioner.embedders.1.model."
    fused = state[bigg + "transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([g[f"text_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(state[bigg + "text_projection"], g["text_projection.weight"].T)
    assert torch.equal(state[bigg + "positional_embedding"], g["text_model.embeddings.position_embedding.weight"])
    for name in ("ln_final.weight", "token_embedding.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                 "transformer.resblocks.0.mlp.c_proj.bias", "transformer.resblocks.0.ln_2.weight",
                 "transformer.resblocks.0.attn.out_proj.weight"):
        assert bigg + name in state, name
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                bigg)
    assert all(k.startswith(prefixes) for k in state)


def test_refiner_file_has_bigg_only_at_embedder_0(comps, tmp_path):
    path = str(tmp_path / "refiner.safetensors")
    _save(comps, "refiner", path)
    state = load_file(path)
    assert "conditioner.embedders.0.model.text_projection" in state
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in state)
    unet = comps.refiner_unet.state_dict()
    # Refiner up level 0 is a plain UpBlock2D: the upsampler follows the resnet directly (index 1).
    assert torch.equal(state["model.diffusion_model.output_blocks.2.1.conv.weight"],
                       unet["up_blocks.0.upsamplers.0.conv.weight"])


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_diffusers_single_file_converter_reads_our_file(comps, other_comps, kind, tmp_path):
    """Independent check with diffusers' own ``from_single_file`` converter. Offline it needs a diffusers folder
    for the component *configs* (``config=``); we write that folder from differently seeded modules, so every
    weight that compares equal can only have come from our single file. All four networks (UNet, VAE, CLIP-L,
    bigG) are checked this way; the tokenizers and the scheduler have no weights and come from the config folder."""
    import diffusers

    path = str(tmp_path / f"{kind}.safetensors")
    _save(comps, kind, path)
    other = other_comps
    config_dir = str(tmp_path / f"config-{kind}")
    unet = other.unet if kind == "base" else other.refiner_unet
    write_pipeline_folder(config_dir, kind, unet, other.vae, other.text_encoder_g, other.tokenizer_g,
                          other.text_encoder_l if kind == "base" else None,
                          other.tokenizer_l if kind == "base" else None)
    cls = diffusers.StableDiffusionXLPipeline if kind == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_single_file(path, config=config_dir, local_files_only=True, add_watermarker=False)
    theirs = {name: getattr(pipe, name) for name in _modules(comps, kind)}
    _assert_same_weights(_modules(comps, kind), theirs)


def test_loader_accepts_ckpt_wrapper_and_known_extras(comps, tmp_path):
    state = to_original_state_dict("refiner", comps.refiner_unet, comps.vae, comps.text_encoder_g)
    state["conditioner.embedders.0.model.logit_scale"] = torch.tensor(4.6)  # open_clip's temperature: not ours
    state["denoiser.sigmas"] = torch.ones(3)  # a training leftover outside every SDXL module
    path = str(tmp_path / "refiner.ckpt")
    torch.save({"state_dict": state}, path)
    loaded = load_single_file(path, "tiny")
    _assert_same_weights(_modules(comps, "refiner"), loaded)


def test_a_wider_autoencoder_round_trips_through_a_single_file(comps, tmp_path):
    from sdxl.models import build_vae
    from sdxl.presets import get_preset

    wide = build_vae("tiny", seed=4, config=get_preset("tiny").vae_config([32, 64, 64], layers_per_block=2))
    path = str(tmp_path / "wide.safetensors")
    save_single_file(path, "refiner", comps.refiner_unet, wide, comps.text_encoder_g)
    loaded = load_single_file(path, "tiny")
    assert list(loaded["vae"].config.block_out_channels) == [32, 64, 64] and loaded["vae"].config.layers_per_block == 2
    _assert_same_weights({"vae": wide}, loaded)


def test_loader_names_what_does_not_fit(comps, tmp_path):
    path = str(tmp_path / "base.safetensors")
    _save(comps, "base", path)
    with pytest.raises(ValueError, match="autoencoder has 3 levels.*preset 'full'"):
        load_single_file(path, "full")
    no_vae = str(tmp_path / "no_vae.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("first_stage_model.")}, no_vae)
    with pytest.raises(ValueError, match="unet.*different preset"):
        load_single_file(no_vae, "full")
    state = load_file(path)
    state["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = torch.ones(1)
    bad = str(tmp_path / "bad.safetensors")
    save_file(state, bad)
    with pytest.raises(KeyError, match="input_blocks.99.0.in_layers.0.weight"):
        load_single_file(bad, "tiny")
    no_unet = {k: v for k, v in load_file(path).items() if not k.startswith("model.diffusion_model.")}
    save_file(no_unet, bad)
    with pytest.raises(ValueError, match="no UNet weights"):
        load_single_file(bad, "tiny")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_single_file(str(tmp_path / "missing.safetensors"), "tiny")
    save_file({"foo.weight": torch.ones(1)}, bad)
    with pytest.raises(ValueError, match="not an SDXL single-file checkpoint"):
        load_single_file(bad, "tiny")


def test_unet_table_is_a_bijection_at_full_size():
    """The full preset's tables map every key to a distinct original key and back (on meta: no memory)."""
    from sdxl.models import build_on_meta
    from sdxl.single_file_keys import vae_table

    meta = build_on_meta("full")
    for key, table in (("unet_base", unet_table(meta["unet_base"].config)),
                       ("unet_refiner", unet_table(meta["unet_refiner"].config)),
                       ("vae", vae_table(meta["vae"].config))):
        state = {k: torch.empty(0) for k in meta[key].state_dict()}
        original = table.convert(state, True, key)
        assert len(original) == len(state)
        assert set(table.convert(original, False, key)) == set(state)


def test_micro_components_round_trip_through_a_single_file(tmp_path):
    """One block per level changes the original layout's block numbering (input_blocks.N); the file still maps back."""
    micro = build_components("micro", kind="base", seed=0)
    path = str(tmp_path / "micro.safetensors")
    save_single_file(path, "base", micro.unet, micro.vae, micro.text_encoder_g, micro.text_encoder_l)
    _assert_same_weights({"unet": micro.unet, "vae": micro.vae}, load_single_file(path, "micro"))
    assert len(micro.unet.down_blocks[1].attentions) == 1
