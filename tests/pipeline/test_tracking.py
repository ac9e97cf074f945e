import mlflow
import pytest
from omegaconf import OmegaConf

from pipeline.tracking import flatten_config, stage_run


def _cfg(tmp_path, **mlflow_overrides):
    return OmegaConf.create({
        "paths": {"root": str(tmp_path / "root")},
        "mlflow": {"tracking_uri": None, "artifact_location": None, "experiment": "t", "enabled": True, **mlflow_overrides},
        "train": {"lr": 1e-4, "long": "x" * 7000},
        "preset_name": "tiny",
    })


def test_flatten_truncates_long_values(tmp_path):
    flat = flatten_config(_cfg(tmp_path))
    assert flat["train.lr"] == "0.0001"
    assert len(flat["train.long"]) == 6000


def test_stage_run_logs_params_metrics_and_nesting(tmp_path):
    cfg = _cfg(tmp_path)
    with stage_run(cfg, "workflow") as parent:
        with stage_run(cfg, "ingest", parent_run_id=parent.run_id) as child:
            child.log_metrics({"kept": 3}, step=1)
    client = mlflow.MlflowClient(parent.tracking_uri)
    run = client.get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0001"
    assert run.data.metrics["kept"] == 3
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert parent.tracking_uri.startswith("sqlite:///") and str(tmp_path / "root") in parent.tracking_uri


def test_failed_stage_marks_run_failed(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run(cfg, "buckets") as tracker:
            raise RuntimeError("boom")
    assert mlflow.MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).info.status == "FAILED"


def test_tracking_off_yields_none(tmp_path):
    with stage_run(_cfg(tmp_path, enabled=False), "x") as tracker:
        assert tracker is None
