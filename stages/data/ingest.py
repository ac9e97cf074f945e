"""Stage `ingest`: the plan of a data run — what `ingest.source` holds, cut into work units (stages/data/plan.py).

Sources: a folder of images with same-stem `.txt` captions (and optional `.json` sidecars; key = the relative path
without extension), a URL list (parquet / CSV / TSV / JSON lines / JSON with `url`, `caption` and any other
columns, which are kept in `meta_json`), or existing WebDataset tars / parquet files with image bytes. Planning
reads listings and parquet footers, never image bytes; `stage=data` plans (or reuses the plan) and then reads each
unit once in its streaming pass. Running `stage=ingest` alone shows what a run would read: units, samples, files
that are neither images nor sidecars.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from pipeline import storage
from pipeline.context import StageContext
from stages.data import plan, sources

log = logging.getLogger(__name__)
STAGE = "ingest"


def absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers need not share the driver's working directory."""
    uri = str(uri)
    return uri if storage.is_remote(uri) or uri.startswith("file://") else os.path.abspath(uri)


def _source(cfg: DictConfig) -> str:
    if not cfg.ingest.get("source"):
        raise ValueError("ingest.source is not set: give a folder of images, a URL list or a folder of shards")
    return absolute(str(cfg.ingest.source))


def make_plan(cfg: DictConfig, plan_dir: str) -> dict[str, Any]:
    """Plan `ingest.source` into ``plan_dir`` (streaming; see stages/data/plan.py); returns the plan info."""
    icfg = cfg.ingest
    source = _source(cfg)
    kind = sources.detect_source_kind(source, str(icfg.get("source_type", "auto")))
    chunk_size = int(icfg.chunk_size)
    if chunk_size < 1:
        raise ValueError(f"ingest.chunk_size must be >= 1, got {chunk_size}")
    for uri in storage.list_files(plan_dir):  # parts of an interrupted planning run: planned again from scratch
        storage.remove(uri)
    writer = plan.PlanWriter(plan_dir)
    if kind == "folder":
        extensions = tuple(str(e).lower() for e in icfg.get("image_extensions", sources.IMAGE_EXTENSIONS))
        extra = plan.plan_folder(writer, source, chunk_size, extensions)
        if extra["ignored_files"]:
            log.warning("ingest: %d files in %s are neither images %s nor caption/sidecar files; not ingested",
                        extra["ignored_files"], source, extensions)
    elif kind == "urls":
        dl = icfg.download
        extra = plan.plan_urls(writer, source, chunk_size, str(dl.url_column), str(dl.caption_column))
    elif kind == "webdataset":
        extra = plan.plan_tars(writer, source)
    else:
        extra = plan.plan_image_parquet(writer, source, chunk_size)
    return writer.close({"source": source, "source_kind": kind, "chunk_size": chunk_size,
                         "counts_known": kind != "webdataset", **extra})


def make_or_load_plan(cfg: DictConfig, dataset_dir: str) -> dict[str, Any]:
    """The finished plan of an earlier run with the same source, else a new one. Another source is refused:
    resuming would mix two datasets."""
    plan_dir = storage.join(dataset_dir, plan.PLAN_DIR)
    source = _source(cfg)
    info = plan.load_info(plan_dir)
    if info is not None:
        if info.get("source") != source:
            raise ValueError(f"{dataset_dir} was planned from {info.get('source')!r}, not ingest.source={source!r}: "
                             f"choose another data.name or delete {dataset_dir}")
        return info
    return make_plan(cfg, plan_dir)


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    info = make_or_load_plan(cfg, absolute(ctx.dataset_dir))
    ctx.log_metrics({f"{STAGE}/units": info["units"], f"{STAGE}/planned_inputs": info["planned_inputs"]})
    log.info("ingest: %s", info)
    return info
