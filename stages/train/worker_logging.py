"""MLflow logging from inside a Ray Train worker.

Ray Train V2 refuses ``MLflowLoggerCallback`` in a TorchTrainer ``RunConfig``, so rank 0 logs straight into the
stage's MLflow run (created by the driver; ``tracking_uri`` + ``run_id`` travel in ``train_loop_config``) through an
``MlflowClient``. Without a tracking URI or run id every call does nothing (tests, tracking off).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

log = logging.getLogger(__name__)


class WorkerLogger:
    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool = True):
        self.run_id = run_id
        self.client = None
        if enabled and tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)

    @property
    def active(self) -> bool:
        return self.client is not None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def register_model(self, name: str, artifact_path: str, tags: dict[str, str] | None = None) -> str | None:
        """Register ``<run artifacts>/<artifact_path>`` as a new version of ``name``; returns the version."""
        if not self.active:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        source = self.client.get_run(self.run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
        version = self.client.create_model_version(name, source=source, run_id=self.run_id, tags=tags or {})
        return str(version.version)

    def log_file_bytes(self, data: bytes, artifact_path: str, file_name: str) -> None:
        """Log ``data`` as ``<artifact_path>/<file_name>`` (through a temporary local file)."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory(prefix="mlflow-artifact-") as scratch:
            local = os.path.join(scratch, file_name)
            with open(local, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, local, artifact_path)


def ray_train_log_level(train_cfg) -> str:
    """``train.ray_log_level`` (a DictConfig or the workers' plain dict), WARNING where a config predates the key:
    read here once for the trainer's ``LoggingConfig`` and for the workers' report lines."""
    return str(train_cfg.get("ray_log_level") or "WARNING").upper()


def quiet_ray_train_reports(level: str) -> None:
    """Give Ray Train's per-report line ("Reporting training result N: TrainingReport(...)") the level its
    ``LoggingConfig`` gives the rest of Ray Train: Ray 2.60 logs it under a logger named after its source file, not
    under ``ray.train``, so that setting does not reach it. Nothing to do where that module is not loaded."""
    module = sys.modules.get("ray.train.v2._internal.execution.context")
    if module is not None:
        logging.getLogger(module.__file__).setLevel(level.upper())


def progress_line(stage: str, step: int, max_steps: int, loss: float, step_time_s: float) -> str:
    """``pretrain256 step 400/1200 (33%) · loss 0.0121 · 0.33 s/step · 4 min 24 s left``."""
    from pipeline.console import format_seconds

    left = max(0, max_steps - step) * step_time_s
    tail = f" · {format_seconds(left)} left" if step < max_steps else " · done"
    return (f"{stage} step {step}/{max_steps} ({100 * step // max(1, max_steps)}%) · loss {loss:.4g} · "
            f"{step_time_s:.2f} s/step{tail}")


class Progress:
    """Rank 0's console progress: one line per log window that comes at least ``every_s`` after the last line, and
    one at the last step, so a long stage shows where it is without a line per window (which MLflow has)."""

    def __init__(self, stage: str, max_steps: int, every_s: float, clock=time.monotonic):
        self.stage, self.max_steps, self.every_s, self.clock = stage, max_steps, every_s, clock
        self.last = clock()

    def update(self, step: int, loss: float, step_time_s: float) -> str | None:
        now = self.clock()
        if step < self.max_steps and now - self.last < self.every_s:
            return None
        self.last = now
        line = progress_line(self.stage, step, self.max_steps, loss, step_time_s)
        log.info(line)
        return line
