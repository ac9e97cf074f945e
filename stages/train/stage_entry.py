"""``run(cfg, ctx)`` of the training stages (pretrain256, pretrain512, finetune_aspect, finetune_quality,
train_refiner, train_vae): check every input on the driver — before Ray Train starts workers — then hand over to
``stages.train.trainer.run_training``.

Each problem is reported as one clear error naming the file, folder or parameter: the task kind, the parent
checkpoint (``train.init_from``), the manifest and the selected subset, the shard files the subset needs, the
stage's bucket table, and (``loader.cached``) the latent cache.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import storage
from stages.train.data_manifest import dataset_dir_from_cfg, latent_cache_dir, select_samples, stage_buckets
from stages.train.sample_weights import sample_repeats
from stages.train.tasks import TASK_KINDS, resolve_init_from, task_option

log = logging.getLogger(__name__)


def check_shards(dataset_dir: str, shards) -> None:
    """Every shard the selected samples live in exists (one listing, not one request per shard)."""
    folder = storage.join(dataset_dir, "shards")
    listed = storage.list_files(folder, suffix=".tar", recursive=True)
    if not listed:
        raise FileNotFoundError(f"no shard files (*.tar) under {folder}: run the data stages first "
                                f"(`python pipeline/run.py stage=data`) or point loader.dataset_dir at a dataset")
    present = {uri.replace("\\", "/").rsplit("/shards/", 1)[-1] for uri in listed}
    needed = sorted({str(s).replace("\\", "/") for s in shards})
    missing = [s for s in needed if s.split("shards/", 1)[-1] not in present]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard file(s) listed in the manifest are missing, e.g. "
                                f"{storage.join(dataset_dir, *missing[0].split('/'))}")


def check_cache(cfg) -> None:
    from stages.train.cache_latents import INFO_FILE, identity_differences, vae_identity  # late: imports torch

    cache_dir = latent_cache_dir(cfg)
    info_uri = storage.join(cache_dir, INFO_FILE)
    if not storage.is_file(info_uri):
        raise FileNotFoundError(f"loader.cached=true but there is no latent cache at {cache_dir} (missing "
                                f"{INFO_FILE}): run stage=cache_latents with this stage's loader settings first")
    identity = storage.read_json(info_uri).get("identity", {})
    lc = cfg.loader
    expected = {"preset": str(cfg.model.preset), "resolution": int(lc.resolution),
                "multi_aspect": bool(lc.multi_aspect), "vae": vae_identity(cfg)}
    differs = identity_differences({k: identity.get(k) for k in expected}, expected)
    wrong = {k: (identity.get(k), expected[k]) for k in differs}
    if wrong:
        raise ValueError(f"latent cache {info_uri} was made for other settings: "
                         + ", ".join(f"{k}={have!r} (this stage: {want!r})" for k, (have, want) in wrong.items()))


def validate_inputs(cfg) -> dict:
    """All driver-side checks; returns a small summary of what the stage will train on."""
    kind = str(task_option(cfg, "task"))
    if kind not in TASK_KINDS:
        raise ValueError(f"train.task must be one of {list(TASK_KINDS)}, got {kind!r}")
    parent = resolve_init_from(cfg)  # names the missing parent folder
    dataset_dir = dataset_dir_from_cfg(cfg)
    samples = select_samples(cfg, dataset_dir)  # names a missing / empty manifest, a bad filter
    lc = cfg.loader
    sample_repeats(samples, lc.get("weight_by"))  # names a bad loader.weight_by (e.g. an unscored column)
    buckets = stage_buckets(samples, int(lc.resolution), int(lc.bucket_multiple), bool(lc.multi_aspect),
                            bool(lc.require_table_match))  # names a manifest made for another resolution
    if bool(lc.get("cached", False)):
        check_cache(cfg)
    else:
        check_shards(dataset_dir, samples["shard"].unique())
    return {"task": kind, "parent_checkpoint": parent or "scratch", "dataset_dir": dataset_dir,
            "samples": int(len(samples)), "buckets": len(set(buckets))}


def run(cfg: DictConfig, ctx) -> dict:
    checked = validate_inputs(cfg)
    log.info("%s: %s", ctx.stage, checked)
    ctx.log_dict(checked, "inputs.json")
    from stages.train.trainer import run_training

    result = run_training(cfg, ctx) or {}
    return {**checked, **result}
