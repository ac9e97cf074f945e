"""Stage `evaluate`: FID, CLIP score and IS of a base checkpoint over guidance scales on held-out prompts (SDXL
Fig. 12 / Table 2), or with ``evaluate.kind=vae`` the autoencoder's reconstruction metrics (Table 3, vae_eval.py).
On models trained on the demo data, ``evaluate.prompt_following.enabled=true`` (or ``evaluate.kind=prompt_following``
alone) adds the known-answer prompt-following score (prompt_following_run.py).

    python pipeline/run.py stage=evaluate [evaluate.checkpoint=runs/pretrain256/final/ema | models:/base/3]
        [evaluate.guidance_scales=[1.5,3,5,8]] [evaluate.num_images=5000] [evaluate.fid_weights=torch_fidelity]

Steps: resolve the checkpoint (generate.py), take the validation split of the dataset's manifest (heldout.py),
extract reference features once, then per guidance scale generate ``evaluate.num_images`` images from the held-out
captions and score them. Outputs: ``results.csv`` / ``results.md`` (the table), ``fid_vs_clip.png`` (Fig. 12
style), ``samples_cfg<s>.png`` and ``summary.json`` under ``<root>/runs/evaluate/<checkpoint tag>/``, logged to
MLflow (report.py). ``evaluate_in_training`` is the small periodic version a trainer calls.

With the offline default networks (``fid_weights=random_small``, ``clip_model=tiny``) the figures are for plumbing
only; the summary's ``feature_weights`` / ``clip_weights`` say so.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.context import StageContext
from stages.evaluate import metrics
from stages.evaluate.features import RANDOM_NOTE, ClipEmbedder, build_image_network, image_features

log = logging.getLogger(__name__)

RANDOM_FIGURES_NOTE = "random feature networks: plumbing only, not image quality"
TABLE_COLUMNS = ("guidance_scale", "fid", "clip_score", "inception_score", "inception_score_std", "num_images")


@dataclass
class Scorers:
    """The networks behind the metrics and what their weights are."""

    net: torch.nn.Module
    net_weights: str
    clip: ClipEmbedder
    clip_weights: str
    is_splits: int = 1


@functools.lru_cache(maxsize=2)
def _cached_scorers(fid_weights: str, feature_seed: int, clip_model: str, clip_pretrained: str | None,
                    is_splits: int, device: str) -> Scorers:
    net, net_weights = build_image_network(fid_weights, seed=feature_seed)
    clip = ClipEmbedder(clip_model, clip_pretrained, seed=feature_seed)
    return Scorers(net=net.to(device), net_weights=net_weights, clip=clip.to(device), clip_weights=clip.weights,
                   is_splits=is_splits)


def build_scorers(ev, device: torch.device | str = "cpu") -> Scorers:
    """The feature networks of ``cfg.evaluate`` (cached: a trainer calling every N steps builds them once)."""
    pretrained = ev.get("clip_pretrained")
    return _cached_scorers(str(ev.get("fid_weights", "random_small")), int(ev.get("feature_seed", 0)),
                           str(ev.get("clip_model", "tiny")), str(pretrained) if pretrained else None,
                           int(ev.get("is_splits", 1)), str(device))


def score_batches(scorers: Scorers, batches: Iterable[tuple[torch.Tensor, list[str]]], real_pool: torch.Tensor,
                  keep: int = 8) -> tuple[dict, torch.Tensor]:
    """Stream (images in [0, 1], prompts) batches: FID against ``real_pool``, CLIP score against the prompts, IS.
    Only features are kept, plus the first ``keep`` images (for the sample grid), which are returned too."""
    pools, logits, image_emb, text_emb, kept = [], [], [], [], []
    image_shape: tuple[int, ...] = ()
    for images, prompts in batches:
        image_shape = tuple(images.shape[1:])
        feats = image_features(scorers.net, images)
        pools.append(feats["pool"])
        logits.append(feats["logits"])
        image_emb.append(scorers.clip.encode_images(images))
        text_emb.append(scorers.clip.encode_texts(list(prompts)))
        room = keep - sum(len(k) for k in kept)
        if room > 0:
            kept.append(images[:room])
    if not pools:
        raise ValueError("no images to score")
    all_logits = torch.cat(logits)
    is_mean, is_std = metrics.inception_score(all_logits, splits=min(scorers.is_splits, all_logits.shape[0]))
    row = {"fid": metrics.frechet_distance(real_pool, torch.cat(pools)),
           "clip_score": metrics.clip_score(torch.cat(image_emb), torch.cat(text_emb)),
           "inception_score": is_mean, "inception_score_std": is_std, "num_images": int(all_logits.shape[0])}
    return row, torch.cat(kept) if kept else torch.zeros(0, *image_shape)


def _grid_png(images: torch.Tensor, count: int = 8) -> bytes:
    from sdxl.sampling import to_pil
    from stages.train.sample_grid import grid_png_bytes

    return grid_png_bytes(to_pil(images[:count]))


def _guidance_scales(ev) -> list[float]:
    scales = list(ev.guidance_scales)
    if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 for s in scales):
        raise ValueError(f"evaluate.guidance_scales must be a non-empty list of numbers >= 0, got {scales}")
    return [float(s) for s in scales]


def heldout_set(cfg: DictConfig, ctx: StageContext):
    from stages.evaluate.heldout import heldout_samples

    ev = cfg.evaluate
    return heldout_samples(ctx.dataset_dir, float(ev.val_fraction), int(ev.max_references),
                           str(ev.get("caption_field", "caption")))


def check_references(count: int, rejects: list[dict], dataset_dir: str) -> None:
    for reject in rejects:
        log.warning("reference image %s left out: %s", reject["key"], reject["reason"])
    if count < 2:
        raise ValueError(f"only {count} readable held-out image(s) in {dataset_dir}; FID needs >= 2 "
                         f"(raise evaluate.val_fraction or evaluate.max_references)")


def reference_features(cfg: DictConfig, ctx: StageContext, scorers: Scorers):
    """(held-out set, pool features of its images [N, D], rejects), reading the images batch by batch."""
    from stages.evaluate.heldout import iter_reference_batches

    heldout = heldout_set(cfg, ctx)
    rejects: list[dict] = []
    pools = [image_features(scorers.net, batch)["pool"]
             for batch in iter_reference_batches(heldout, int(cfg.evaluate.resolution), 32, rejects)]
    pool = torch.cat(pools) if pools else torch.zeros(0, scorers.net.dims["pool"], dtype=torch.float64)
    check_references(pool.shape[0], rejects, ctx.dataset_dir)
    return heldout, pool, rejects


def evaluate_generation(cfg: DictConfig, ctx: StageContext) -> dict:
    from stages.evaluate import plots, report
    from stages.evaluate.generate import (build_generator, generate_batches, pick_device, prompts_for,
                                          resolve_checkpoint)

    ev = cfg.evaluate
    scales = _guidance_scales(ev)
    device = pick_device(str(ev.get("device", "auto")))
    ref = resolve_checkpoint(ev.get("checkpoint"), ctx.root, "base", bool(ev.get("allow_random", False)),
                             ctx.tracking_uri)
    scorers = build_scorers(ev, device)
    heldout, real_pool, rejects = reference_features(cfg, ctx, scorers)
    gen = build_generator(ref, cfg, device)
    prompts = prompts_for(heldout.prompts, int(ev.num_images))
    rows, files, flat, series = [], {}, {}, []
    for scale in scales:
        scores, kept = score_batches(scorers, generate_batches(gen, prompts, scale, int(ev.batch_size)), real_pool)
        row = {"guidance_scale": scale, **scores}
        rows.append(row)
        files[f"samples_cfg{scale:g}.png"] = _grid_png(kept)
        for name, key in (("fid", "fid"), ("clip_score", "clip_score"), ("is", "inception_score")):
            flat[report.scale_name(name, scale)] = row[key]
        series.append({"eval_fid": row["fid"], "eval_clip_score": row["clip_score"],
                       "eval_is": row["inception_score"], "eval_guidance_scale": scale})
        log.info("evaluate cfg=%g: FID %.3f, CLIP score %.2f, IS %.3f", scale, row["fid"], row["clip_score"],
                 row["inception_score"])
    note = RANDOM_FIGURES_NOTE if any(RANDOM_NOTE in w for w in (scorers.net_weights, scorers.clip_weights)) else ""
    preamble = (f"Checkpoint: {ref.description}; {len(prompts)} images per scale from held-out captions, "
                f"{real_pool.shape[0]} reference images at {int(ev.resolution)} px. Features: {scorers.net_weights}; "
                f"CLIP: {scorers.clip_weights}.")
    files["results.csv"] = plots.table_csv(rows, TABLE_COLUMNS)
    files["results.md"] = plots.table_markdown(rows, TABLE_COLUMNS, preamble)
    files["fid_vs_clip.png"] = plots.fid_clip_curve_png(rows, note=note)
    summary = {"kind": "base", "checkpoint": ref.description, "sources": gen.sources,
               "feature_weights": scorers.net_weights, "clip_weights": scorers.clip_weights,
               "num_references": int(real_pool.shape[0]), "reference_rejects": len(rejects),
               "num_images": len(prompts), "guidance_scales": scales, "rows": rows, "metrics": flat}
    files["summary.json"] = json.dumps(summary, indent=2, sort_keys=True).encode("utf-8")
    published = report.publish(ctx, ref, files, flat, series, bool(ev.get("log_to_training_run", True)))
    return {**summary, **published}


def evaluate_prompt_following(cfg: DictConfig, ctx: StageContext) -> dict:
    """The known-answer prompt-following score of a model trained on demo data (prompt_following_run.py)."""
    from stages.evaluate import report
    from stages.evaluate.generate import CheckpointRef
    from stages.evaluate.conditioning_use import ATTRIBUTES
    from stages.evaluate.prompt_following_run import evaluate_prompt_following as run_score

    summary, files = run_score(cfg, ctx)
    metrics = {f"prompt_following_{name}": summary[name]
               for name in ("object_color_accuracy", "background_accuracy", "position_accuracy", "shape_accuracy",
                            "background_lightness_auc") if summary.get(name) is not None}
    use = summary["conditioning_use"]
    for attribute in ATTRIBUTES:
        metrics[f"conditioning_use_{attribute}_gain"] = use[attribute]["gain"]
        metrics[f"conditioning_use_{attribute}_z"] = use[attribute]["z"]
    ref = CheckpointRef(summary["source"], tag="prompt_following")
    published = report.publish(ctx, ref, files, metrics, [], log_to_training=False)
    grid = published["files"]["prompt_following_grid.png"]
    headline = {k: summary[k] for k in summary if k not in ("images", "settings")}
    return {**headline, "grid": grid, "output_dir": published["output_dir"], "files": published["files"]}


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    kind = str(cfg.evaluate.get("kind", "base"))
    if kind == "base":
        result = evaluate_generation(cfg, ctx)
        if bool((cfg.evaluate.get("prompt_following") or {}).get("enabled", False)):
            result["prompt_following"] = evaluate_prompt_following(cfg, ctx)
        return result
    if kind == "prompt_following":
        return {"prompt_following": evaluate_prompt_following(cfg, ctx)}
    if kind == "vae":
        from stages.evaluate.vae_eval import evaluate_vae

        return evaluate_vae(cfg, ctx)
    raise ValueError(f"evaluate.kind must be 'base', 'prompt_following' or 'vae', got {kind!r}")


# ---------------------------------------------------------------------------------------------- during training
def _as_tensor(images) -> torch.Tensor:
    """PIL images or a [N, 3, H, W] tensor → float [N, 3, H, W] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    from torchvision.transforms.functional import pil_to_tensor

    images = list(images)
    if not images:
        raise ValueError("no images to evaluate")
    return torch.stack([pil_to_tensor(im.convert("RGB")) for im in images]).float() / 255.0


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True,
                                           align_corners=False).clamp(0, 1)


def evaluate_in_training(task_like, model, step: int, cfg, reference_images=None,
                         prompts: list[str] | None = None) -> dict[str, float]:
    """A small evaluation a trainer can run every N steps: ``{"eval/fid", "eval/clip_score", "eval/is"}``.

    ``task_like``: a TrainTask (its ``sample_images(model, step)`` is called) or a callable ``(model, step) ->
    images`` (PIL list or [N, 3, H, W] tensor). ``reference_images``: PIL list or tensor; None reads up to
    ``evaluate.in_training.num_images`` held-out images of the training dataset (``loader.dataset_dir`` or
    ``<root>/data/<data.name>``). ``prompts``: what the images were generated from (default: the task's sample
    prompts, ``train.sample.prompts``); the CLIP score is left out when they do not match the images one to one.
    """
    sampler = getattr(task_like, "sample_images", task_like)
    if not callable(sampler):
        raise TypeError("task_like must have sample_images(model, step) or be callable, got "
                        f"{type(task_like).__name__}")
    ev = cfg.get("evaluate") or OmegaConf.create({})
    fake = _as_tensor(sampler(model, step))
    size = tuple(fake.shape[-2:])
    if reference_images is None:
        from stages.evaluate.heldout import heldout_samples, load_reference_images
        from stages.train.data_manifest import dataset_dir_from_cfg

        limit = int((ev.get("in_training") or {}).get("num_images", 4))
        heldout = heldout_samples(dataset_dir_from_cfg(cfg), float(ev.get("val_fraction", 0.1)), limit)
        reference_images = load_reference_images(heldout, int(size[0]))[0]
    real = _resize(_as_tensor(reference_images), size)
    if prompts is None:
        from stages.train.task_diffusion import sample_settings

        prompts = sample_settings(cfg)["prompts"]
    scorers = build_scorers(ev, "cpu")
    real_pool = image_features(scorers.net, real)["pool"]
    if prompts is not None and len(prompts) == fake.shape[0]:
        row, _ = score_batches(scorers, [(fake, list(prompts))], real_pool, keep=0)
        return {"eval/fid": row["fid"], "eval/is": row["inception_score"], "eval/clip_score": row["clip_score"]}
    feats = image_features(scorers.net, fake)
    return {"eval/fid": metrics.frechet_distance(real_pool, feats["pool"]),
            "eval/is": metrics.inception_score(feats["logits"])[0]}
