"""Stage `data`: the plan (`ingest`), one streaming pass that does the per-sample work of `ingest`, `filter`,
`caption` and `buckets` and writes the final shards (stages/data/stream.py), then the metadata steps (`buckets`:
dedup, manifest, rejects, shard index, stats, plots). Each step resumes where a killed run stopped: the plan is kept,
finished units are not read again, a finished finalize is not redone.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline.context import StageContext
from stages.data import buckets, ingest, stream

log = logging.getLogger(__name__)


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    dataset_dir = ingest.absolute(ctx.dataset_dir)
    info = ingest.make_or_load_plan(cfg, dataset_dir)
    log.info("data: %d units, %d planned inputs from %s (%s)", info["units"], info["planned_inputs"],
             info["source"], info["source_kind"])
    passed = stream.run_pass(cfg, dataset_dir)
    stats = buckets.finalize_dataset(cfg, ctx, force=passed["units_run"] > 0)
    ctx.log_metrics({"data/units_run": passed["units_run"]})
    return {"dataset_dir": ctx.dataset_dir, "kept": stats["samples_kept"], "rejected": stats["samples_rejected"],
            "num_shards": stats["num_shards"], "units": info["units"], "units_run": passed["units_run"],
            "stages": stats["stages"]}
