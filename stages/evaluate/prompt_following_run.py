"""``evaluate.prompt_following``: the known-answer score of a base model trained on the demo data.

Generates one image per held-out demo prompt (prompt_following.py) either with our sampler on a trained checkpoint
(``backend=native``) or with diffusers' ``StableDiffusionXLPipeline`` on an exported folder (``backend=diffusers``,
what a user of the export gets), reads colour / background / position from the pixels and scores them against the
prompts. The reader itself is checked on the held-out split's real images (``reader_accuracy``), so a low score
means the model, not the measure. The same model's *conditioning use* (conditioning_use.py: how much worse it
denoises held-out images when a word of the caption is wrong) comes with it, which shows partial learning that the
read-back cannot. Writes ``prompt_following.json`` and ``prompt_following_grid.png``.
"""

from __future__ import annotations

import json
import logging

import torch

from pipeline import storage
from stages.evaluate.conditioning_use import ATTRIBUTES, conditioning_use
from stages.evaluate.prompt_following import (heldout_specs, labelled_grid, read_image, reading_dict, score,
                                              spec_from_caption)

log = logging.getLogger(__name__)
BACKENDS = ("native", "diffusers")


def settings(cfg) -> dict:
    pf = cfg.evaluate.get("prompt_following") or {}
    ev = cfg.evaluate
    out = {"num_prompts": int(pf.get("num_prompts", 54)), "seed": int(pf.get("seed", 0)),
           "guidance_scale": float(pf.get("guidance_scale", 5.0)),
           "steps": int(pf.get("steps") or ev.steps), "sampler": str(pf.get("sampler") or ev.sampler),
           "resolution": int(pf.get("resolution") or ev.resolution), "backend": str(pf.get("backend", "native")),
           "diffusers_dir": pf.get("diffusers_dir"), "batch_size": int(pf.get("batch_size") or ev.batch_size),
           "num_validation": int(pf.get("num_validation", 200)), "use_images": int(pf.get("use_images", 128))}
    if out["backend"] not in BACKENDS:
        raise ValueError(f"evaluate.prompt_following.backend must be one of {list(BACKENDS)}, got {out['backend']!r}")
    if out["num_prompts"] < 1 or out["batch_size"] < 1:
        raise ValueError("evaluate.prompt_following.num_prompts and batch_size must be >= 1")
    if out["use_images"] < 2:
        raise ValueError(f"evaluate.prompt_following.use_images must be >= 2, got {out['use_images']}")
    return out


def training_captions(dataset_dir: str) -> tuple[list[str], list]:
    """(every caption of the dataset, the demo specs they parse to); fails clearly on a dataset that is not demo
    data."""
    from stages.train.data_manifest import read_manifest

    captions = [str(c) for c in read_manifest(dataset_dir)["caption"].fillna("")]
    specs = [spec_from_caption(c) for c in captions]
    parsed = sum(s is not None for s in specs)
    if parsed < 0.9 * max(1, len(captions)):
        raise ValueError(f"evaluate.prompt_following needs a model trained on the demo data (stage=demo_data): only "
                         f"{parsed} of {len(captions)} captions in {dataset_dir} use the demo vocabulary")
    return captions, specs


def heldout_demo_images(dataset_dir: str, val_fraction: float, limit: int) -> list[tuple]:
    """(position in the held-out split, manifest row, spec, RGB image) of each of the first ``limit`` held-out images
    whose caption is in the demo vocabulary, decoded once for every check that reads them."""
    from stages.data.sources import decode_rgb
    from stages.evaluate.heldout import heldout_samples
    from stages.train.data_shards import TarShardReader

    heldout = heldout_samples(dataset_dir, val_fraction, limit)
    reader = TarShardReader(dataset_dir)
    found = []
    try:
        for position, (row, caption) in enumerate(zip(heldout.rows.itertuples(index=False), heldout.prompts)):
            spec = spec_from_caption(caption)
            if spec is None:
                continue
            try:
                member = str(getattr(row, "member_key", None) or row.key)
                image = decode_rgb(reader.image_bytes(str(row.shard), member))
            except (OSError, ValueError) as err:  # a shard member that no longer decodes: skipped, and said so
                log.warning("held-out image %s skipped: %s", row.key, err)
                continue
            found.append((position, row, spec, image))
    finally:
        reader.close()
    return found


def reader_accuracy(images: list[tuple], resolution: int, limit: int, dataset_dir: str) -> dict:
    """The reader on the first ``limit`` real held-out demo images (``heldout_demo_images``; shorter side resized to
    ``resolution``): it should score ≈ 1."""
    from sdxl.crops import cover_size, image_size, resize

    readings, specs = [], []
    for _, _, spec, image in (item for item in images if item[0] < limit):
        readings.append(read_image(resize(image, cover_size(image_size(image), (resolution, resolution)))))
        specs.append(spec)
    if not specs:
        raise ValueError(f"no held-out demo images to check the reader on in {dataset_dir}")
    return score(readings, specs)


@torch.no_grad()
def heldout_latents(images: list[tuple], resolution: int, limit: int, vae, scale: float, dataset_dir: str
                    ) -> tuple[torch.Tensor, list, torch.Tensor]:
    """(scaled latents, specs, base time ids) of the first ``limit`` held-out demo images (``heldout_demo_images``):
    Alg. 1's crop with a centred offset to ``resolution``², c_size from the manifest's original size."""
    import numpy as np

    from sdxl.conditioner import base_time_ids
    from sdxl.crops import bucket_crop_resize

    crops, specs, sizes, offsets = [], [], [], []
    for _, row, spec, image in (item for item in images if item[0] < limit):
        crop, info = bucket_crop_resize(image, (resolution, resolution), mode="center")
        crops.append(np.asarray(crop, dtype=np.float32))
        specs.append(spec)
        sizes.append((int(getattr(row, "orig_h", image.size[1])), int(getattr(row, "orig_w", image.size[0]))))
        offsets.append(info.c_crop)
    if len(specs) < 2:
        raise ValueError(f"conditioning use needs >= 2 held-out demo images in {dataset_dir}, found {len(specs)}")
    pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) / 127.5 - 1.0
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    latents = torch.cat([vae.encode(pixels[i:i + 32].to(device, dtype)).latent_dist.mean.float()
                         for i in range(0, len(specs), 32)]) * scale
    time_ids = base_time_ids(sizes, offsets, (resolution, resolution), len(specs))
    return latents, specs, time_ids


def measure_conditioning_use(model, backend: str, images: list[tuple], s: dict, dataset_dir: str) -> dict:
    """conditioning_use.py's gains for the evaluated model on the held-out split at the evaluation resolution."""
    unet, vae, scale, encode = _parts_for_use(model, backend)
    latents, specs, time_ids = heldout_latents(images, s["resolution"], s["use_images"], vae, scale, dataset_dir)
    return conditioning_use(unet, encode, latents, specs, time_ids, seed=s["seed"], batch_size=s["batch_size"])


def _native_parts(cfg, ctx):
    """Our sampler's pieces (stages.evaluate.generate.Generator) on the configured checkpoint, and its description."""
    from stages.evaluate.generate import build_generator, pick_device, resolve_checkpoint

    ev = cfg.evaluate
    ref = resolve_checkpoint(ev.get("checkpoint"), ctx.root, "base", bool(ev.get("allow_random", False)),
                             ctx.tracking_uri)
    return build_generator(ref, cfg, pick_device(str(ev.get("device", "auto")))), ref.description


def _native_images(gen, prompts: list[str], s: dict) -> list:
    from sdxl.sampling import to_pil
    from stages.evaluate.generate import generate_batches

    gen.resolution, gen.steps, gen.sampler, gen.seed = s["resolution"], s["steps"], s["sampler"], s["seed"]
    images = []
    for batch, _ in generate_batches(gen, prompts, s["guidance_scale"], s["batch_size"]):
        images += to_pil(batch)
    return images


def _diffusers_pipeline(cfg, ctx, s: dict):
    from diffusers import StableDiffusionXLPipeline

    from sdxl.sampling import make_scheduler

    folder = str(s["diffusers_dir"] or storage.join(ctx.root, "export", "diffusers", "base"))
    if not storage.is_file(storage.join(folder, "model_index.json")):
        raise FileNotFoundError(f"evaluate.prompt_following.diffusers_dir: no model_index.json in {folder}; run "
                                "stage=export first or point it at an exported base folder")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = make_scheduler(s["sampler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe, f"diffusers StableDiffusionXLPipeline ({folder})"


def _diffusers_images(pipe, prompts: list[str], s: dict) -> list:
    images = []
    for index, start in enumerate(range(0, len(prompts), s["batch_size"])):
        generator = torch.Generator().manual_seed(s["seed"] + index)
        out = pipe(prompt=prompts[start:start + s["batch_size"]], height=s["resolution"], width=s["resolution"],
                   num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"], generator=generator)
        images += list(out.images)
    return images


def _parts_for_use(model, backend: str):
    """(unet, vae, latent scale, encode: prompts → (context, pooled)) of the evaluated model."""
    if backend == "diffusers":
        def encode(prompts):
            embeds, _, pooled, _ = model.encode_prompt(prompt=prompts, device=model.unet.device,
                                                       do_classifier_free_guidance=False)
            return embeds, pooled

        return model.unet, model.vae, float(model.vae.config.scaling_factor), encode
    return model.unet, model.vae, float(model.vae_scale_factor), model.conditioner.encode


def evaluate_prompt_following(cfg, ctx) -> tuple[dict, dict[str, bytes]]:
    """(summary, files) of the prompt-following evaluation; see the module doc."""
    s = settings(cfg)
    captions, _ = training_captions(ctx.dataset_dir)
    specs = heldout_specs(s["num_prompts"], s["seed"], exclude_prompts=captions)
    prompts = [spec.prompt for spec in specs]
    if s["backend"] == "diffusers":
        model, source = _diffusers_pipeline(cfg, ctx, s)
        images = _diffusers_images(model, prompts, s)
    else:
        model, source = _native_parts(cfg, ctx)
        images = _native_images(model, prompts, s)
    readings = [read_image(image) for image in images]
    scores = score(readings, specs)
    real = heldout_demo_images(ctx.dataset_dir, float(cfg.evaluate.val_fraction),
                               max(s["num_validation"], s["use_images"]))
    reader = reader_accuracy(real, s["resolution"], s["num_validation"], ctx.dataset_dir)
    use = measure_conditioning_use(model, s["backend"], real, s, ctx.dataset_dir)
    summary = {**scores, "source": source, "settings": s, "conditioning_use": use,
               "reader_on_real_images": {k: v for k, v in reader.items() if not k.startswith("chance")},
               "images": [{"prompt": p, **reading_dict(r)} for p, r in zip(prompts, readings)]}
    grid = labelled_grid(images[:48], specs[:48], readings[:48])
    import io

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    files = {"prompt_following.json": json.dumps(summary, indent=2, sort_keys=True).encode("utf-8"),
             "prompt_following_grid.png": buf.getvalue()}
    log.info("prompt following (%s, %d prompts): object colour %.2f (chance %.2f), background %.2f (chance %.2f), "
             "position %.2f (chance %.2f), shape %.2f (chance %.2f), background lightness AUC %s (chance 0.5); the "
             "reader on real images: %.2f / %.2f / %.2f / %.2f", source, len(prompts),
             scores["object_color_accuracy"], scores["object_color_chance"], scores["background_accuracy"],
             scores["background_chance"], scores["position_accuracy"], scores["position_chance"],
             scores["shape_accuracy"], scores["shape_chance"],
             "n/a" if scores["background_lightness_auc"] is None else f"{scores['background_lightness_auc']:.2f}",
             reader["object_color_accuracy"], reader["background_accuracy"], reader["position_accuracy"],
             reader["shape_accuracy"])
    log.info("conditioning use (x0 error with the wrong word vs the true caption, %d held-out images): background "
             "%+.1f%% (z %.1f), object colour %+.1f%% (z %.1f), position %+.1f%% (z %.1f), shape %+.1f%% (z %.1f)",
             use["num_images"],
             *[value for a in ATTRIBUTES for value in (100 * use[a]["gain"], use[a]["z"])])
    return summary, files
