"""The pipeline on an object-store root: `paths.root=s3://<bucket>/root` against moto's S3 server on 127.0.0.1.

Data stages → a short training stage → serving from the trained checkpoint, each through the CLI. MLflow stays a
local SQLite store (the default for a remote root: ~/.cache/sdxl-pipeline/mlflow.db, here under a private HOME) and
its artifacts go to s3 under the root.
"""

from __future__ import annotations

import os
import uuid

import pytest

from tests.cluster.helpers import (
    TINY_DATA,
    SMALL_REQUEST,
    check_dataset,
    child_env,
    demo_keys,
    http_status,
    make_demo_source,
    mlflow_runs,
    require_stage,
    run_stage,
    start_serve,
    stop_tree,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]
N_IMAGES = 10
STAGE_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    """A bucket of this module's own, a local demo source, and a private HOME for the default MLflow store."""
    import boto3

    base = tmp_path_factory.mktemp("s3-stages")
    bucket = f"sdxl-cluster-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["env"]["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    home = base / "home"
    home.mkdir()
    return {"bucket": bucket, "root": f"s3://{bucket}/root", "source": make_demo_source(base / "src", N_IMAGES),
            "home": home, "logs": base / "logs", "env": child_env({"HOME": str(home)}),
            "tracking_uri": f"sqlite:///{home / '.cache' / 'sdxl-pipeline' / 'mlflow.db'}",
            "endpoint": s3_server["env"]["AWS_ENDPOINT_URL"]}


def _object_keys(s3_run, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_run["endpoint"])
    keys, token = [], None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=s3_run["bucket"], Prefix=prefix, **extra)
        keys += [item["Key"] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


@pytest.fixture(scope="module")
def s3_data(s3_run):
    args = [*TINY_DATA, f"paths.root={s3_run['root']}", f"ingest.source={s3_run['source']}", "ingest.chunk_size=4"]
    return run_stage("data", args, s3_run["logs"] / "data.log", s3_run["env"], STAGE_TIMEOUT_S)


def test_data_stages_write_the_dataset_to_s3(s3_run, s3_data):
    summary = s3_data.check()
    assert summary["dataset_dir"] == f"{s3_run['root']}/data/default"
    counts = check_dataset(summary["dataset_dir"], demo_keys(s3_run["source"]))
    assert counts["kept"] > 0
    # Nothing of the dataset landed on the local disk under a folder literally named "s3:".
    assert not os.path.exists("s3:") and not os.path.exists(os.path.join(str(s3_run["home"]), "s3:"))
    runs = mlflow_runs(s3_run["tracking_uri"], "data")
    assert runs and runs[0].info.status == "FINISHED"
    assert runs[0].info.artifact_uri.startswith(f"{s3_run['root']}/mlartifacts/")
    assert any(key.endswith("summary.json") for key in _object_keys(s3_run, "root/mlartifacts/"))


@pytest.fixture(scope="module")
def s3_training(s3_run, s3_data):
    require_stage("pretrain256")
    s3_data.check()
    args = ["preset=tiny", "ray.num_cpus=2", f"paths.root={s3_run['root']}", "train.max_steps=2",
            "train.checkpoint_every=2", "cluster.num_workers=1"]
    return run_stage("pretrain256", args, s3_run["logs"] / "pretrain256.log", s3_run["env"], STAGE_TIMEOUT_S)


def test_training_checkpoints_and_final_weights_go_to_s3(s3_run, s3_training):
    from pipeline import storage

    s3_training.check()
    keys = _object_keys(s3_run, "root/runs/pretrain256/")
    assert any("/checkpoint_" in key for key in keys), keys[:20]
    info = storage.read_json(f"{s3_run['root']}/runs/pretrain256/final/info.json")
    assert info["step"] == 2
    assert any(key.startswith("root/runs/pretrain256/final/ema/") for key in keys)
    runs = mlflow_runs(s3_run["tracking_uri"], "pretrain256")
    assert runs and runs[0].info.status == "FINISHED" and "loss" in runs[0].data.metrics


def test_serve_loads_the_checkpoint_from_s3(s3_run, s3_training):
    """A relative serve.checkpoint under an s3:// root exists only in the bucket: each replica copies it from s3, and
    a folder it cannot find fails the replica, so /health never answers 200 (start_serve then fails)."""
    require_stage("serve")
    s3_training.check()
    proc, url = start_serve([f"paths.root={s3_run['root']}", "serve.checkpoint=runs/pretrain256/final",
                             "serve.refiner_ensemble=false"], s3_run["logs"] / "serve.log", s3_run["env"])
    try:
        status, body, content_type = http_status(f"{url}/generate", SMALL_REQUEST, timeout_s=120)
        assert status == 200, body[:500]
        assert content_type == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        stop_tree(proc)
