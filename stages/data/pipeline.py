"""Stage `data`: ingest → filter → caption → buckets, in order, each resuming where a previous run stopped."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline.context import StageContext
from stages.data import buckets, caption, filter as filter_stage, ingest

log = logging.getLogger(__name__)
STAGES = (("ingest", ingest.run), ("filter", filter_stage.run), ("caption", caption.run), ("buckets", buckets.run))


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    summary = {}
    for name, stage_run in STAGES:
        log.info("data: running stage %s", name)
        summary[name] = stage_run(cfg, ctx)
    return {"dataset_dir": ctx.dataset_dir, "kept": summary["buckets"]["kept"],
            "rejected": summary["buckets"]["rejected"], "num_shards": summary["buckets"]["num_shards"],
            "stages": {name: {k: v for k, v in summary[name].get("stage_counts", summary[name]).items()
                              if k in ("kept", "rejected")} for name in summary}}
