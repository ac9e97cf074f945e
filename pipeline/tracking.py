"""MLflow: one run per stage (nested under a workflow run when stages are chained), the resolved config as params.

We use the client API with explicit run ids rather than mlflow's fluent "active run", so that code running in other
processes (Ray Train workers) can log into the same run given ``(tracking_uri, run_id)``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from pipeline import storage

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(cfg: DictConfig) -> str:
    configured = cfg.mlflow.get("tracking_uri")
    if configured:
        return str(configured)
    root = str(cfg.paths.root)
    if storage.is_remote(root):
        folder = os.path.expanduser("~/.cache/sdxl-pipeline")
        log.warning("paths.root is remote (%s): MLflow uses a local SQLite store in %s; set mlflow.tracking_uri "
                    "to a tracking server to share runs", root, folder)
    else:
        folder = os.path.abspath(root)
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}"


def resolve_artifact_location(cfg: DictConfig) -> str:
    configured = cfg.mlflow.get("artifact_location")
    if configured:
        return str(configured)
    root = str(cfg.paths.root)
    return storage.join(root, "mlartifacts") if storage.is_remote(root) else os.path.abspath(os.path.join(root, "mlartifacts"))


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Dotted keys → string values (resolved), truncated to MLflow's param length."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            text = str(node)
            flat[prefix] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."

    walk("", container)
    return flat


class Tracker:
    """Logs into one MLflow run. Safe to pickle as (tracking_uri, run_id) and rebuild elsewhere."""

    def __init__(self, tracking_uri: str, run_id: str):
        import mlflow

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # the store takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if os.path.isdir(local_path):
            self.client.log_artifacts(self.run_id, local_path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


def _experiment_id(client, name: str, artifact_location: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it between our look-up and create
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextmanager
def stage_run(cfg: DictConfig, stage: str, parent_run_id: str | None = None) -> Iterator[Tracker | None]:
    """Open an MLflow run for a stage; mark it FINISHED or FAILED on exit. Yields None when tracking is off."""
    if not cfg.mlflow.get("enabled", True):
        yield None
        return
    import mlflow

    uri = resolve_tracking_uri(cfg)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, str(cfg.mlflow.experiment), resolve_artifact_location(cfg))
    tags = {"stage": stage, "preset": str(cfg.get("preset_name", ""))}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    tracker = Tracker(uri, run.info.run_id)
    tracker.log_params(flatten_config(cfg))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)
