"""`ray job submit -- python pipeline/run.py stage=...` against a private local Ray head, as users run it on a cluster:
the job's driver joins the head (not an embedded Ray), writes the dataset / checkpoints under paths.root and logs its
MLflow run into the SQLite store under that root."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.cluster.helpers import TINY_DATA, check_dataset, demo_keys, make_demo_source, mlflow_runs, require_stage
from tests.cluster.ray_head import RayHead

pytestmark = [pytest.mark.slow, pytest.mark.integration]
N_IMAGES = 12
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(num_cpus=2, log_dir=tmp_path_factory.mktemp("ray-head"))
    try:
        head.start()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def job_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs")
    source = make_demo_source(base / "src", N_IMAGES)
    return {"root": str(base / "root"), "source": source}


def _submit_and_wait(head: RayHead, args: list[str]) -> tuple[str, str]:
    job_id = head.submit(args, submission_id=f"sdxl-test-{uuid.uuid4().hex[:8]}")
    return head.wait_job(job_id, JOB_TIMEOUT_S)


@pytest.fixture(scope="module")
def data_job(ray_head, job_root):
    # ray.num_cpus only sizes an embedded Ray: a job joins the head, whose size is its own.
    args = ["stage=data", *TINY_DATA, f"paths.root={job_root['root']}", f"ingest.source={job_root['source']}",
            "ingest.chunk_size=4"]
    status, logs = _submit_and_wait(ray_head, args)
    return {"status": status, "logs": logs}


def test_data_job_joins_the_head_and_writes_the_dataset(data_job, job_root):
    assert data_job["status"] == "SUCCEEDED", data_job["logs"][-6000:]
    # The driver joined the head through $RAY_ADDRESS rather than starting its own Ray.
    assert "joining Ray cluster" in data_job["logs"]
    assert "starting an embedded local Ray" not in data_job["logs"]
    dataset = os.path.join(job_root["root"], "data", "default")
    counts = check_dataset(dataset, demo_keys(job_root["source"]))
    assert counts["kept"] > 0 and counts["shards"] > 0
    assert counts["stats"]  # stats.json written beside the manifest
    runs = mlflow_runs(f"sqlite:///{os.path.join(job_root['root'], 'mlflow.db')}", "data")
    assert runs and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["paths.root"] == job_root["root"]
    assert "stage_seconds" in runs[0].data.metrics


def test_training_job_trains_from_the_dataset(ray_head, data_job, job_root):
    require_stage("pretrain256")
    assert data_job["status"] == "SUCCEEDED", "the data job failed; see the previous test"
    args = ["stage=pretrain256", "preset=tiny", f"paths.root={job_root['root']}", "train.max_steps=2",
            "train.checkpoint_every=2", "cluster.num_workers=1"]
    status, logs = _submit_and_wait(ray_head, args)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "joining Ray cluster" in logs
    run_dir = os.path.join(job_root["root"], "runs", "pretrain256")
    assert any(name.startswith("checkpoint_") for name in os.listdir(run_dir)), os.listdir(run_dir)
    from pipeline import storage

    assert storage.read_json(os.path.join(run_dir, "final", "info.json"))["step"] == 2
    runs = mlflow_runs(f"sqlite:///{os.path.join(job_root['root'], 'mlflow.db')}", "pretrain256")
    assert runs and runs[0].info.status == "FINISHED"
    assert "loss" in runs[0].data.metrics
