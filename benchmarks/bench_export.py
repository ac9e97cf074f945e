"""How exactly the exported models reproduce ours: the measured differences behind tests/test_export.py's tolerances.

``stage=export`` (stages/export.py) runs on a root holding tiny "trained" modules (seeded random weights saved the
way the training stages save them). Then, on the same prompt, seed and steps:
- the exported base folder through diffusers' ``StableDiffusionXLPipeline`` against our ``sample_base`` +
  ``decode_latents``: the largest pixel difference, in 8-bit levels (the test allows 1 level, 1/255);
- the exported refiner folder through ``StableDiffusionXLImg2ImgPipeline`` against our ``refine_sdedit``: the same;
- the exported single files read by diffusers' own ``from_single_file`` converter (component configs from a folder of
  differently seeded modules, so every weight can only come from the file): the largest absolute difference over
  every tensor of the UNet, VAE and text encoders against the trained modules (tests/sdxl/test_single_file.py asserts
  equality).

Run: ``python benchmarks/run.py export`` (RESULTS.md § export) or ``python benchmarks/bench_export.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

from sdxl.presets import get_preset  # noqa: E402

PROMPT = "a red cube on a wooden table"
SIZE, BASE_STEPS, REFINER_STEPS, STRENGTH, GUIDANCE, SEED = 64, 3, 8, 0.25, 5.0, 7


def _trained_root(root: Path) -> dict:
    from sdxl.models import build_unet, build_vae

    modules = {"base": build_unet("tiny", "base", seed=11), "refiner": build_unet("tiny", "refiner", seed=21),
               "vae": build_vae("tiny", seed=31)}
    for stage, name in (("finetune_aspect", "base"), ("train_refiner", "refiner"), ("train_vae", "vae")):
        final = root / "runs" / stage / "final"
        modules[name].save_pretrained(str(final / "ema"))
        (final / "info.json").write_text(json.dumps({"stage": stage, "step": 1}))
    return modules


def _max_abs_diff(ours: dict, theirs: dict) -> float:
    worst = 0.0
    for name, module in ours.items():
        a, b = module.state_dict(), theirs[name].state_dict()
        if set(a) != set(b):
            raise RuntimeError(f"{name}: the single file's keys differ from the trained module's")
        worst = max([worst, *((a[k].float() - b[k].float()).abs().max().item() for k in a)])
    return worst


def _single_file_diff(path: str, kind: str, trained: dict, config_dir: str) -> float:
    import diffusers

    from sdxl.diffusers_folder import write_pipeline_folder
    from sdxl.models import build_components

    other = build_components("tiny", kind="both", seed=99)
    write_pipeline_folder(config_dir, kind, other.unet if kind == "base" else other.refiner_unet, other.vae,
                          other.text_encoder_g, other.tokenizer_g, other.text_encoder_l if kind == "base" else None,
                          other.tokenizer_l if kind == "base" else None)
    cls = diffusers.StableDiffusionXLPipeline if kind == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_single_file(path, config=config_dir, local_files_only=True, add_watermarker=False)
    return _max_abs_diff(trained, {name: getattr(pipe, name) for name in trained})


def main() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    try:
        return _measure()
    finally:
        torch.set_num_threads(threads)


def _measure() -> dict:
    from hydra import compose, initialize_config_dir

    from pipeline.context import StageContext
    from sdxl.conditioner import TextConditioner
    from sdxl.diffusers_folder import load_pipeline
    from sdxl.models import build_text_encoders
    from sdxl.sampling import SampleParams, decode_latents, refine_sdedit, sample_base
    from sdxl.tokenizers import load_tokenizers
    from stages.export import run

    with tempfile.TemporaryDirectory(prefix="bench-export-") as folder, torch.no_grad():
        root = Path(folder) / "root"
        modules = _trained_root(root)
        with initialize_config_dir(config_dir=os.path.join(_REPO, "pipeline", "conf"), version_base=None):
            cfg = compose(config_name="config", overrides=["preset=tiny", "stage=export", f"paths.root={root}"])
        run(cfg, StageContext(root=str(root), stage="export"))
        out = root / "export"
        # The text encoders every stage conditions on at the tiny preset: random at train.seed.
        text_l, text_g = build_text_encoders("tiny", seed=int(cfg.train.seed))
        tok_l, tok_g = load_tokenizers(None)
        base_text = TextConditioner(tok_l, text_l, tok_g, text_g, kind="base")
        refiner_text = TextConditioner(None, None, tok_g, text_g, kind="refiner")

        down = get_preset("tiny").vae_downsample
        cond, uncond = base_text.encode_for_sampling(PROMPT, original_size=(SIZE, SIZE))
        params = SampleParams(height=SIZE, width=SIZE, steps=BASE_STEPS, guidance_scale=GUIDANCE, seed=SEED,
                              latent_downsample=down)
        ours = decode_latents(modules["vae"], sample_base(modules["base"], cond, uncond, params))
        theirs = load_pipeline(str(out / "diffusers" / "base"))(
            prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=BASE_STEPS, guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(SEED), output_type="pt").images
        base_levels = (ours - theirs).abs().max().item() * 255

        rcond, runcond = refiner_text.encode_for_sampling(PROMPT, original_size=(SIZE, SIZE))
        latents = torch.randn(1, 4, SIZE // down, SIZE // down, generator=torch.Generator().manual_seed(3))
        ours = decode_latents(modules["vae"], refine_sdedit(modules["refiner"], latents, rcond, runcond,
                                                            strength=STRENGTH, steps=REFINER_STEPS, seed=SEED,
                                                            guidance_scale=GUIDANCE, latent_downsample=down))
        theirs = load_pipeline(str(out / "diffusers" / "refiner"))(
            prompt=PROMPT, image=latents, strength=STRENGTH, num_inference_steps=REFINER_STEPS,
            guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), output_type="pt").images
        refiner_levels = (ours - theirs).abs().max().item() * 255

        trained_base = {"unet": modules["base"], "vae": modules["vae"], "text_encoder": text_l,
                        "text_encoder_2": text_g}
        trained_refiner = {"unet": modules["refiner"], "vae": modules["vae"], "text_encoder_2": text_g}
        single_base = _single_file_diff(str(out / "sdxl_base.safetensors"), "base", trained_base,
                                        os.path.join(folder, "config-base"))
        single_refiner = _single_file_diff(str(out / "sdxl_refiner.safetensors"), "refiner", trained_refiner,
                                           os.path.join(folder, "config-refiner"))
    return {
        "setup": f"tiny preset, {SIZE}x{SIZE} px, base {BASE_STEPS} steps, refiner SDEdit {REFINER_STEPS} steps at "
                 f"strength {STRENGTH}, cfg {GUIDANCE}, seed {SEED}, CPU float32",
        "base_pipeline_max_pixel_diff_levels": round(base_levels, 4),
        "refiner_img2img_max_pixel_diff_levels": round(refiner_levels, 4),
        "tests_allow_pixel_diff_levels": 1,
        "single_file_base_max_abs_diff": single_base,
        "single_file_refiner_max_abs_diff": single_refiner,
        "tests_allow_single_file_diff": 0,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
