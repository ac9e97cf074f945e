"""tests/mlflow_template.py: a seeded store is a working MLflow store, and an existing store is left alone."""

from __future__ import annotations

import os

from tests import mlflow_template


def test_a_seeded_store_tracks_and_registers(tmp_path):
    import mlflow

    path = str(tmp_path / "root" / "mlflow.db")
    assert mlflow_template.sqlite_file(f"sqlite:///{path}") == path
    assert mlflow_template.sqlite_file("postgresql://host/db") is None
    client = mlflow.MlflowClient(f"sqlite:///{path}")  # the session's wrapper seeds it (tests/conftest.py)
    experiment = client.create_experiment("sdxl", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    client.create_registered_model("base")
    assert client.get_metric_history(run.info.run_id, "loss")[0].value == 0.5
    assert [m.name for m in client.search_registered_models()] == ["base"]
    assert {e.name for e in client.search_experiments()} == {"sdxl", "Default"}


def test_an_existing_store_is_never_replaced(tmp_path):
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"someone's store")
    assert mlflow_template.seed(str(existing)) is False
    assert existing.read_bytes() == b"someone's store"
    fresh = tmp_path / "new" / "mlflow.db"
    assert mlflow_template.seed(str(fresh)) is True and os.path.getsize(fresh) > 0
