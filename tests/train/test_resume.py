"""Starting a new stage from another run's checkpoint (``train.resume_from``), and a finished run left alone."""

import os

import pytest

from pipeline.context import StageContext
from tests.train.toy_task import assert_same_weights, final_weights, reference_run, toy_cfg


@pytest.mark.slow
def test_resume_from_path_continues_exactly_and_logs_to_mlflow(tmp_path, ray_local):
    from mlflow import MlflowClient

    from stages.train.trainer import run_training

    ref_root, reference = reference_run()
    checkpoint = os.path.join(ref_root, "runs", "reference", "checkpoint_000000002")
    root = str(tmp_path / "root")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "art"))).info.run_id
    ctx = StageContext(root=root, stage="child", tracking_uri=uri, run_id=run_id)
    out = run_training(toy_cfg(root, resume_from=checkpoint, sample_every=3), ctx)
    assert out["step"] == 4 and out["metrics"]["resumed_from_step"] == 2
    for which in ("model", "ema"):
        assert_same_weights(final_weights(root, "child", which), reference[which])
    # Rank 0 logged into the driver's run: metrics per step, the sample grid, final weights, a model version.
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [3, 4]
    metrics = client.get_run(run_id).data.metrics
    assert {"lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_fraction", "memory_gb"} <= set(metrics)
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/step_000003.png"]
    assert {a.path for a in client.list_artifacts(run_id, "final")} >= {"final/ema", "final/model", "final/info.json"}
    assert os.path.exists(os.path.join(root, "runs", "child", "samples", "step_000003.png"))
    version = client.get_model_version("toy", "1")
    assert version.run_id == run_id and version.source.endswith("final/ema")


@pytest.mark.slow
def test_finished_run_is_not_retrained(ray_local):
    from stages.train.trainer import run_training

    ref_root, reference = reference_run()
    final = os.path.join(ref_root, "runs", "reference", "final", "model", "model.safetensors")
    mtime = os.path.getmtime(final)
    out = run_training(toy_cfg(ref_root), StageContext(root=ref_root, stage="reference"))
    assert out["step"] == 4
    assert os.path.getmtime(final) == mtime  # final/ already holds step 4: not exported again
    assert_same_weights(final_weights(ref_root, "reference", "model"), reference["model"], atol=0.0)
