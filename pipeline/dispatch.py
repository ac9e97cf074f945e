"""Run one stage: join or start Ray when it needs it, open its MLflow run, hand it a StageContext, write its result."""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from pipeline import logs, storage
from pipeline.context import StageContext, result_uri
from pipeline.ray_env import init_ray
from pipeline.registry import get_stage
from pipeline.tracking import stage_run

log = logging.getLogger(__name__)


def execute(stage: str, cfg: DictConfig, overrides: list[str] | None = None, parent_run_id: str | None = None) -> dict:
    """Run ``stage`` with its composed config. ``overrides`` are the user's command-line overrides, kept so that
    chained workflows can compose each sub-stage's config the way the user would have.

    The result is also written to ``<root>/results/<stage>.json`` (atomically), for scripts and for a look later.
    """
    spec = get_stage(stage)
    spec.check_config(cfg)
    if spec.needs_ray:
        init_ray(cfg.ray, long_stage=spec.long_running)
    started = time.time()
    logs.set_progress_label(stage)
    with stage_run(cfg, stage, parent_run_id) as tracker:
        ctx = StageContext(
            root=str(cfg.paths.root),
            stage=stage,
            dataset=str(cfg.data.name),
            tracking_uri=tracker.tracking_uri if tracker else None,
            run_id=tracker.run_id if tracker else None,
            tracker=tracker,
            extra={"overrides": list(overrides or [])},
        )
        log.info("stage %s: root=%s", stage, ctx.root)
        try:
            result = spec.load()(cfg, ctx) or {}
        except Exception as exc:
            if not hasattr(exc, "failed_stage"):  # the innermost stage of a chain names itself in the error line
                exc.failed_stage = stage
            raise
        result.setdefault("stage", stage)
        result["seconds"] = round(time.time() - started, 2)
        if tracker is not None:
            tracker.log_metrics({"stage_seconds": result["seconds"]})
            tracker.log_dict(result, "summary.json")
            result["mlflow_run_id"] = tracker.run_id
    storage.write_json_atomic(result_uri(ctx.root, stage), result)
    return result
