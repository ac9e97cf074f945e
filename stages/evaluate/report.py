"""Publishing an evaluation: files under ``<root>/runs/evaluate/<checkpoint tag>/``, metrics and artifacts in the
evaluation's MLflow run and, when the checkpoint's ``final/info.json`` names one, in its training run too.

MLflow metric names may not contain ``@``, so the per-scale names read ``fid_cfg5``, ``clip_score_cfg1.5``,
``is_cfg8`` (the ``fid@cfg5`` of the brief); the same values are also logged as series ``eval_fid`` /
``eval_clip_score`` / ``eval_is`` / ``eval_guidance_scale`` with the scale's index as the step, which MLflow's UI
plots as a curve.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

from pipeline import storage

log = logging.getLogger(__name__)


def checkpoint_tag(description: str) -> str:
    """A folder name for a checkpoint: ``pretrain256/final/ema`` → ``pretrain256_final_ema``, a path → its last
    three parts, ``models:/base/3`` → ``models_base_3``."""
    if description.startswith("models:/"):
        text = "models/" + description[len("models:/"):]
    else:
        text = "/".join(description.rstrip("/").replace("\\", "/").split("/")[-3:])
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")
    return tag[:120] or "checkpoint"


def scale_name(metric: str, guidance_scale: float) -> str:
    return f"{metric}_cfg{float(guidance_scale):g}"


def write_outputs(out_dir: str, files: dict[str, bytes]) -> dict[str, str]:
    """Write each file atomically under ``out_dir`` (local or URI); returns name → URI."""
    written = {}
    for name, data in files.items():
        uri = storage.join(out_dir, name)
        storage.write_bytes_atomic(uri, data)
        written[name] = uri
    return written


def _stage_locally(files: dict[str, bytes], scratch_root: str) -> str:
    folder = tempfile.mkdtemp(prefix="evaluate-", dir=scratch_root)
    for name, data in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return folder


def log_to_training_run(tracking_uri: str | None, run_id: str | None, metrics: dict[str, float],
                        series: list[dict[str, float]], files_dir: str, artifact_path: str) -> str | None:
    """Log into the checkpoint's training run; returns the run id, or None (with a logged reason) when it cannot."""
    if not run_id:
        return None
    if not tracking_uri:
        log.warning("checkpoint names training run %s but MLflow tracking is off; not logging there", run_id)
        return None
    from pipeline.tracking import Tracker

    try:
        tracker = Tracker(tracking_uri, run_id)
        tracker.client.get_run(run_id)
        tracker.log_metrics(metrics)
        for step, values in enumerate(series):
            tracker.log_metrics(values, step=step)
        tracker.log_artifact(files_dir, artifact_path)
    except Exception as err:  # a run in another store, or deleted: the evaluation itself still stands
        log.warning("could not log the evaluation into training run %s at %s: %s", run_id, tracking_uri, err)
        return None
    return run_id


def publish(ctx, ref, files: dict[str, bytes], metrics: dict[str, float], series: list[dict[str, float]],
            log_to_training: bool = True) -> dict:
    """Write ``files`` to ``<root>/runs/evaluate/<tag>/`` and log metrics, series and files to MLflow."""
    tag = ref.tag or checkpoint_tag(ref.description)
    out_dir = storage.join(ctx.runs_dir("evaluate"), tag)
    written = write_outputs(out_dir, files)
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    ctx.log_metrics(clean)
    for step, values in enumerate(series):
        ctx.log_metrics({k: float(v) for k, v in values.items() if v is not None}, step=step)
    ctx.set_tags({"evaluated_checkpoint": ref.description,
                  "training_run_id": ref.training_run_id or "none"})
    local = _stage_locally(files, ctx.scratch_dir())
    try:
        ctx.log_artifact(local, f"evaluate/{tag}")
        training_run = None
        if log_to_training:
            training_run = log_to_training_run(ctx.tracking_uri, ref.training_run_id, clean,
                                               [{k: float(v) for k, v in s.items() if v is not None} for s in series],
                                               local, f"evaluate/{tag}")
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return {"output_dir": out_dir, "files": written, "logged_to_training_run": training_run}
