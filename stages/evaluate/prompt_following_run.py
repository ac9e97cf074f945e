"""``evaluate.prompt_following``: the known-answer score of a base model trained on the demo data.

Generates one image per held-out demo prompt (prompt_following.py) either with our sampler on a trained checkpoint
(``backend=native``) or with diffusers' ``StableDiffusionXLPipeline`` on an exported folder (``backend=diffusers``,
what a user of the export gets), reads colour / background / position from the pixels and scores them against the
prompts. The reader itself is checked on the held-out split's real images (``reader_accuracy``), so a low score
means the model, not the measure. Writes ``prompt_following.json`` and ``prompt_following_grid.png``.
"""

from __future__ import annotations

import json
import logging

import torch

from pipeline import storage
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
           "num_validation": int(pf.get("num_validation", 200))}
    if out["backend"] not in BACKENDS:
        raise ValueError(f"evaluate.prompt_following.backend must be one of {list(BACKENDS)}, got {out['backend']!r}")
    if out["num_prompts"] < 1 or out["batch_size"] < 1:
        raise ValueError("evaluate.prompt_following.num_prompts and batch_size must be >= 1")
    return out


def training_captions(dataset_dir: str) -> tuple[list[str], list]:
    """(every caption of the dataset, the demo specs they parse to). Fails clearly on a dataset that is not demo data."""
    from stages.train.data_manifest import read_manifest

    captions = [str(c) for c in read_manifest(dataset_dir)["caption"].fillna("")]
    specs = [spec_from_caption(c) for c in captions]
    parsed = sum(s is not None for s in specs)
    if parsed < 0.9 * max(1, len(captions)):
        raise ValueError(f"evaluate.prompt_following needs a model trained on the demo data (stage=demo_data): only "
                         f"{parsed} of {len(captions)} captions in {dataset_dir} use the demo vocabulary")
    return captions, specs


def reader_accuracy(dataset_dir: str, val_fraction: float, resolution: int, limit: int) -> dict:
    """The reader on real held-out demo images (shorter side resized to ``resolution``): it should score ≈ 1."""
    from PIL import Image

    from stages.data.sources import decode_rgb
    from stages.evaluate.heldout import heldout_samples
    from stages.train.data_shards import TarShardReader

    heldout = heldout_samples(dataset_dir, val_fraction, limit)
    reader = TarShardReader(dataset_dir)
    readings, specs = [], []
    try:
        for row, caption in zip(heldout.rows.itertuples(index=False), heldout.prompts):
            spec = spec_from_caption(caption)
            if spec is None:
                continue
            image = decode_rgb(reader.image_bytes(str(row.shard), str(getattr(row, "member_key", None) or row.key)))
            factor = resolution / min(image.size)
            size = (max(8, round(image.size[0] * factor)), max(8, round(image.size[1] * factor)))
            readings.append(read_image(image.resize(size, Image.Resampling.BICUBIC)))
            specs.append(spec)
    finally:
        reader.close()
    if not specs:
        raise ValueError(f"no held-out demo images to check the reader on in {dataset_dir}")
    return score(readings, specs)


def _native_images(cfg, ctx, prompts: list[str], s: dict) -> tuple[list, str]:
    from sdxl.sampling import to_pil
    from stages.evaluate.generate import build_generator, generate_batches, pick_device, resolve_checkpoint

    ev = cfg.evaluate
    ref = resolve_checkpoint(ev.get("checkpoint"), ctx.root, "base", bool(ev.get("allow_random", False)),
                             ctx.tracking_uri)
    gen = build_generator(ref, cfg, pick_device(str(ev.get("device", "auto"))))
    gen.resolution, gen.steps, gen.sampler, gen.seed = s["resolution"], s["steps"], s["sampler"], s["seed"]
    images = []
    for batch, _ in generate_batches(gen, prompts, s["guidance_scale"], s["batch_size"]):
        images += to_pil(batch)
    return images, ref.description


def _diffusers_images(cfg, ctx, prompts: list[str], s: dict) -> tuple[list, str]:
    from diffusers import StableDiffusionXLPipeline

    from sdxl.sampling import make_scheduler

    folder = str(s["diffusers_dir"] or storage.join(ctx.root, "export", "diffusers", "base"))
    if not storage.is_file(storage.join(folder, "model_index.json")):
        raise FileNotFoundError(f"evaluate.prompt_following.diffusers_dir: no model_index.json in {folder}; run "
                                "stage=export first or point it at an exported base folder")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = make_scheduler(s["sampler"])
    pipe.set_progress_bar_config(disable=True)
    images = []
    for index, start in enumerate(range(0, len(prompts), s["batch_size"])):
        generator = torch.Generator().manual_seed(s["seed"] + index)
        out = pipe(prompt=prompts[start:start + s["batch_size"]], height=s["resolution"], width=s["resolution"],
                   num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"], generator=generator)
        images += list(out.images)
    return images, f"diffusers StableDiffusionXLPipeline ({folder})"


def evaluate_prompt_following(cfg, ctx) -> tuple[dict, dict[str, bytes]]:
    """(summary, files) of the prompt-following evaluation; see the module doc."""
    s = settings(cfg)
    captions, _ = training_captions(ctx.dataset_dir)
    specs = heldout_specs(s["num_prompts"], s["seed"], exclude_prompts=captions)
    prompts = [spec.prompt for spec in specs]
    make = _diffusers_images if s["backend"] == "diffusers" else _native_images
    images, source = make(cfg, ctx, prompts, s)
    readings = [read_image(image) for image in images]
    scores = score(readings, specs)
    reader = reader_accuracy(ctx.dataset_dir, float(cfg.evaluate.val_fraction), s["resolution"], s["num_validation"])
    summary = {**scores, "source": source, "settings": s,
               "reader_on_real_images": {k: v for k, v in reader.items() if not k.startswith("chance")},
               "images": [{"prompt": p, **reading_dict(r)} for p, r in zip(prompts, readings)]}
    grid = labelled_grid(images[:48], specs[:48], readings[:48])
    import io

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    files = {"prompt_following.json": json.dumps(summary, indent=2, sort_keys=True).encode("utf-8"),
             "prompt_following_grid.png": buf.getvalue()}
    log.info("prompt following (%s, %d prompts): object colour %.2f (chance %.2f), background %.2f (chance %.2f), "
             "position %.2f (chance %.2f); the reader on real images: %.2f / %.2f / %.2f", source, len(prompts),
             scores["object_color_accuracy"], scores["object_color_chance"], scores["background_accuracy"],
             scores["background_chance"], scores["position_accuracy"], scores["position_chance"],
             reader["object_color_accuracy"], reader["background_accuracy"], reader["position_accuracy"])
    return summary, files
