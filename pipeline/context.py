"""What a stage receives besides its config: where to read and write, and how to log."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage


def result_uri(root: str, stage: str) -> str:
    """Where a stage's full result (the dict its ``run`` returned, with timing and MLflow run id) is written."""
    return storage.join(str(root), "results", f"{stage}.json")


@dataclass
class StageContext:
    """Handed to every stage's ``run(cfg, ctx)``.

    ``tracking_uri`` and ``run_id`` identify the stage's MLflow run, so code running elsewhere (a Ray Train worker)
    can log into the same run with ``mlflow.MlflowClient(tracking_uri)``. ``tracker`` is None when tracking is off
    (unit tests); the log helpers then do nothing.
    """

    root: str
    stage: str
    dataset: str = "default"
    tracking_uri: str | None = None
    run_id: str | None = None
    tracker: Any = None  # pipeline.tracking.Tracker
    extra: dict = field(default_factory=dict)

    @property
    def dataset_dir(self) -> str:
        return storage.join(self.root, "data", self.dataset)

    def stage_dir(self, name: str | None = None) -> str:
        """Intermediate folder of a data stage: ``<dataset_dir>/<name>``."""
        return storage.join(self.dataset_dir, name or self.stage)

    def runs_dir(self, stage: str | None = None) -> str:
        """Training/evaluation outputs: ``<root>/runs/<stage>``."""
        return storage.join(self.root, "runs", stage or self.stage)

    def scratch_dir(self) -> str:
        """A local folder for files made before they are uploaded (plots, exports)."""
        path = os.path.join(tempfile.gettempdir(), "sdxl-pipeline", self.stage)
        os.makedirs(path, exist_ok=True)
        return path

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.tracker is not None:
            self.tracker.log_artifact(local_path, artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        if self.tracker is not None:
            self.tracker.log_dict(obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.tracker is not None:
            self.tracker.set_tags(tags)
