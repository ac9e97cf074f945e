"""Stage `export`: trained tiny models → diffusers folders + single files that diffusers loads offline and that
generate exactly what our own sampling path generates."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline.context import StageContext
from sdxl.conditioner import TextConditioner
from sdxl.diffusers_folder import load_pipeline
from sdxl.models import build_components, build_text_encoders, build_unet, build_vae
from sdxl.presets import get_preset
from sdxl.sampling import SampleParams, decode_latents, refine_sdedit, sample_base
from sdxl.single_file import load_single_file
from sdxl.tokenizers import load_tokenizers
from stages.export import resolve_sources, run

CONF = Path(__file__).resolve().parents[1] / "pipeline" / "conf"
PROMPT = "a red cube on a wooden table"
SIZE = 64
DOWN = get_preset("tiny").vae_downsample  # pixels per latent
MAX_PIXEL_ERROR = 1 / 255


def _cfg(**export_overrides):
    export = OmegaConf.merge(OmegaConf.load(CONF / "export" / "default.yaml"), export_overrides)
    return OmegaConf.create({"model": OmegaConf.load(CONF / "model" / "default.yaml"), "export": export})


def _save_trained(root: Path, stage: str, module, weights: str = "ema") -> None:
    final = root / "runs" / stage / "final"
    module.save_pretrained(str(final / weights))
    (final / "info.json").write_text(json.dumps({"stage": stage, "step": 3}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A root as the training stages leave it: an older pretrain256 and a newer finetune_aspect base (EMA and raw
    weights), a trained refiner and a trained VAE. Each with its own seed, so we can tell which one was exported."""
    root = tmp_path_factory.mktemp("root")
    modules = {"base": build_unet("tiny", "base", seed=11), "refiner": build_unet("tiny", "refiner", seed=21),
               "vae": build_vae("tiny", seed=31)}
    _save_trained(root, "pretrain256", build_unet("tiny", "base", seed=13))
    _save_trained(root, "finetune_aspect", modules["base"])
    _save_trained(root, "finetune_aspect", build_unet("tiny", "base", seed=12), weights="model")
    _save_trained(root, "train_refiner", modules["refiner"])
    _save_trained(root, "train_vae", modules["vae"])
    return root, modules


@pytest.fixture(scope="module")
def exported(trained):
    root, modules = trained
    result = run(_cfg(), StageContext(root=str(root), stage="export"))
    return root / "export", result, modules


@pytest.fixture(scope="module")
def text_side():
    """The text encoders the training stages conditioned on (tiny preset: random at model seed 0)."""
    text_l, text_g = build_text_encoders("tiny", seed=0)
    tok_l, tok_g = load_tokenizers(None)
    return (TextConditioner(tok_l, text_l, tok_g, text_g, kind="base"),
            TextConditioner(None, None, tok_g, text_g, kind="refiner"))


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_writes_every_output(exported):
    out, result, _ = exported
    assert sorted(result["outputs"]) == [os.path.join(result["export_dir"], rel) for rel in (
        "diffusers/base", "diffusers/refiner", "sdxl_base.safetensors", "sdxl_refiner.safetensors")]
    assert result["base_source"].endswith(os.path.join("finetune_aspect", "final", "ema"))
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
                 "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json",
                 "tokenizer_2/merges.txt"):
        assert (out / "diffusers" / "base" / name).is_file(), name
    refiner = out / "diffusers" / "refiner"
    assert not (refiner / "text_encoder").exists() and not (refiner / "tokenizer").exists()
    index = json.loads((refiner / "model_index.json").read_text())
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    assert json.loads((out / "diffusers" / "base" / "model_index.json").read_text())["force_zeros_for_empty_prompt"]
    summary = json.loads((out / "export.json").read_text())
    assert summary["training_info"]["base"] == {"stage": "finetune_aspect", "step": 3}
    assert summary["unconditional"] == {"base": "zeros", "refiner": "empty_prompt"}
    readme = (out / "README.txt").read_text()
    assert "sdxl_base.safetensors" in readme and "finetune_aspect" in readme
    assert not [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".staging-", ".old-"))]


def test_exported_base_generates_what_our_sampler_generates(exported, text_side):
    out, _, modules = exported
    pipe = load_pipeline(str(out / "diffusers" / "base"))
    assert _same_weights(pipe.unet, modules["base"]) and _same_weights(pipe.vae, modules["vae"])
    base_text, _ = text_side
    cond, uncond = base_text.encode_for_sampling(PROMPT, original_size=(SIZE, SIZE))
    # The exported encoders and tokenizers reproduce our conditioning (negative: zeros, force_zeros_for_empty_prompt).
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    torch.testing.assert_close(embeds, cond.context)
    torch.testing.assert_close(pooled, cond.pooled)
    assert not neg_embeds.any() and not neg_pooled.any()

    params = SampleParams(height=SIZE, width=SIZE, steps=3, guidance_scale=5.0, seed=7, latent_downsample=DOWN)
    ours = decode_latents(modules["vae"], sample_base(modules["base"], cond, uncond, params))
    theirs = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert theirs.shape == ours.shape == (1, 3, SIZE, SIZE)
    assert (ours - theirs).abs().max().item() <= MAX_PIXEL_ERROR

    # An explicit negative_prompt="" is encoded on both sides (force_zeros_for_empty_prompt covers None only).
    _, uncond_empty = base_text.encode_for_sampling(PROMPT, "", original_size=(SIZE, SIZE))
    _, neg_embeds, _, neg_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True, negative_prompt="")
    torch.testing.assert_close(neg_embeds, uncond_empty.context)
    torch.testing.assert_close(neg_pooled, uncond_empty.pooled)
    ours_empty = decode_latents(modules["vae"], sample_base(modules["base"], cond, uncond_empty, params))
    theirs_empty = pipe(prompt=PROMPT, negative_prompt="", height=SIZE, width=SIZE, num_inference_steps=3,
                        guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert (ours_empty - theirs_empty).abs().max().item() <= MAX_PIXEL_ERROR
    assert (ours_empty - ours).abs().max().item() > 10 * MAX_PIXEL_ERROR  # the two unconditional inputs differ


def test_exported_refiner_img2img_matches_our_sdedit(exported, text_side):
    out, _, modules = exported
    pipe = load_pipeline(str(out / "diffusers" / "refiner"))
    assert pipe.text_encoder is None and _same_weights(pipe.unet, modules["refiner"])
    _, refiner_text = text_side
    cond, uncond = refiner_text.encode_for_sampling(PROMPT, original_size=(SIZE, SIZE))
    # The refiner's unconditional input is the encoding of "" (force_zeros_for_empty_prompt false), on both sides.
    _, neg_embeds, _, neg_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    torch.testing.assert_close(neg_embeds, uncond.context)
    torch.testing.assert_close(neg_pooled, uncond.pooled)
    assert neg_embeds.any()
    base_latents = torch.randn(1, 4, SIZE // DOWN, SIZE // DOWN, generator=torch.Generator().manual_seed(3))
    kwargs = {"strength": 0.25, "guidance_scale": 5.0}
    ours = decode_latents(modules["vae"], refine_sdedit(modules["refiner"], base_latents, cond, uncond, steps=8,
                                                        seed=5, latent_downsample=DOWN, **kwargs))
    theirs = pipe(prompt=PROMPT, image=base_latents, num_inference_steps=8, generator=torch.Generator().manual_seed(5),
                  output_type="pt", **kwargs).images
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= MAX_PIXEL_ERROR


def test_exported_single_files_load_back_as_the_trained_modules(exported, text_side):
    out, _, modules = exported
    base = load_single_file(str(out / "sdxl_base.safetensors"), "tiny")
    assert _same_weights(base["unet"], modules["base"]) and _same_weights(base["vae"], modules["vae"])
    assert _same_weights(base["text_encoder"], text_side[0].text_encoder_l)
    assert _same_weights(base["text_encoder_2"], text_side[0].text_encoder_g)
    refiner = load_single_file(str(out / "sdxl_refiner.safetensors"), "tiny")
    assert set(refiner) == {"unet", "vae", "text_encoder_2"}
    assert _same_weights(refiner["unet"], modules["refiner"])


def test_exported_folder_is_a_starting_point_for_build_components(exported):
    out, _, modules = exported
    comps = build_components("tiny", kind="both", pretrained=str(out / "diffusers" / "base"),
                             pretrained_refiner=str(out / "diffusers" / "refiner"))
    assert _same_weights(comps.unet, modules["base"]) and _same_weights(comps.refiner_unet, modules["refiner"])
    assert _same_weights(comps.vae, modules["vae"])
    assert len(comps.tokenizer_l) == len(comps.tokenizer_g) == 49408 and comps.tokenizer_g.pad_token == "!"


def test_exported_config_says_what_the_weights_were_trained_with(trained, tmp_path):
    """A base whose final/info.json records the encoding of "" as its unconditional input exports
    force_zeros_for_empty_prompt=false, so diffusers guides it with what it saw in training."""
    root, _ = trained
    other = tmp_path / "root"
    shutil.copytree(root / "runs", other / "runs")
    (other / "runs" / "finetune_aspect" / "final" / "info.json").write_text(
        json.dumps({"stage": "finetune_aspect", "step": 3, "lineage": {"unconditional": "empty_prompt"}}))
    run(_cfg(single_file=False, refiner="none"), StageContext(root=str(other), stage="export"))
    index = json.loads((other / "export" / "diffusers" / "base" / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is False
    assert json.loads((other / "export" / "export.json").read_text())["unconditional"] == {"base": "empty_prompt"}


def test_sources_follow_config(trained, tmp_path):
    root, _ = trained
    # An unfinished newer stage (weights but no info.json, the completion marker) is not taken.
    unfinished = root / "runs" / "finetune_quality" / "final" / "ema"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    try:
        assert resolve_sources(_cfg().export, str(root)).base_stage == "finetune_aspect"
    finally:
        shutil.rmtree(root / "runs" / "finetune_quality")
    sources = resolve_sources(_cfg(weights="model", refiner="none", vae="none").export, str(root))
    assert sources.base.endswith(os.path.join("finetune_aspect", "final", "model"))
    assert sources.refiner is None and sources.vae is None
    explicit = resolve_sources(_cfg(base=str(root / "runs" / "pretrain256" / "final")).export, str(root))
    assert explicit.base == str(root / "runs" / "pretrain256" / "final" / "ema") and explicit.base_stage is None


def test_float16_export_then_export_without_refiner_removes_the_earlier_one(trained, tmp_path):
    root, _ = trained
    other = tmp_path / "root"
    shutil.copytree(root / "runs", other / "runs")
    ctx = StageContext(root=str(other), stage="export")
    run(_cfg(diffusers=False, dtype="float16"), ctx)
    refiner_file = load_file(str(other / "export" / "sdxl_refiner.safetensors"))
    assert refiner_file["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert refiner_file["conditioner.embedders.0.model.text_projection"].dtype == torch.float16
    assert refiner_file["first_stage_model.decoder.conv_out.weight"].dtype == torch.float32  # the VAE stays fp32
    result = run(_cfg(refiner="none", diffusers=False), ctx)
    assert result["outputs"] == [os.path.join(result["export_dir"], "sdxl_base.safetensors")]
    assert result["refiner_source"] is None
    assert not (other / "export" / "sdxl_refiner.safetensors").exists()
    summary = json.loads((other / "export" / "export.json").read_text())
    assert summary["removed_stale"] == ["sdxl_refiner.safetensors"]


def test_missing_stage_outputs_name_the_expected_paths(tmp_path, trained):
    ctx = StageContext(root=str(tmp_path / "empty"), stage="export")
    with pytest.raises(FileNotFoundError) as err:
        run(_cfg(), ctx)
    message = str(err.value)
    for stage in ("finetune_quality", "finetune_aspect", "pretrain512", "pretrain256"):
        assert os.path.join(str(tmp_path / "empty"), "runs", stage, "final", "ema", "config.json") in message
    root, _ = trained
    missing = str(tmp_path / "no-such-refiner")
    with pytest.raises(FileNotFoundError, match="export.refiner=.*no-such-refiner"):
        resolve_sources(_cfg(refiner=missing).export, str(root))
    with pytest.raises(ValueError, match="export.weights"):
        resolve_sources(_cfg(weights="latest").export, str(root))
    refiner_as_base = str(root / "runs" / "train_refiner" / "final")
    with pytest.raises(ValueError, match="does not hold the base UNet"):
        run(_cfg(base=refiner_as_base, refiner="none"), StageContext(root=str(tmp_path / "r"), stage="export"))


@pytest.mark.slow
@pytest.mark.integration
def test_export_to_an_s3_root(trained, s3_bucket, tmp_path):
    """The object-store path end to end (moto S3 on 127.0.0.1): trained folders are read from s3://, outputs are
    uploaded, files of an older export that the new one lacks are deleted, and the single file loads back."""
    from pipeline import storage

    root, modules = trained
    s3_root = f"{s3_bucket}/root"
    for path in (root / "runs").rglob("*"):
        if path.is_file() and "train_refiner" not in path.parts:
            storage.write_bytes_atomic(storage.join(s3_root, *path.relative_to(root).parts), path.read_bytes())
    stale = storage.join(s3_root, "export", "diffusers", "base", "unet", "stale.bin")
    storage.write_bytes_atomic(stale, b"from an older export")
    result = run(_cfg(), StageContext(root=s3_root, stage="export"))
    assert result["outputs"] == [storage.join(s3_root, "export", rel) for rel in ("diffusers/base",
                                                                                 "sdxl_base.safetensors")]
    assert result["base_source"] == storage.join(s3_root, "runs", "finetune_aspect", "final", "ema")
    assert not storage.exists(stale)
    assert storage.is_file(storage.join(s3_root, "export", "diffusers", "base", "unet",
                                        "diffusion_pytorch_model.safetensors"))
    assert storage.is_file(storage.join(s3_root, "export", "README.txt"))
    local = tmp_path / "sdxl_base.safetensors"
    local.write_bytes(storage.read_bytes(storage.join(s3_root, "export", "sdxl_base.safetensors")))
    loaded = load_single_file(str(local), "tiny")
    assert _same_weights(loaded["unet"], modules["base"]) and _same_weights(loaded["vae"], modules["vae"])
