"""Shared fixtures. Tests never reach the network: hubs are offline and servers bind 127.0.0.1."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on a 2-core machine: one intra-op thread per process is several times faster than two fighting
# over the cores with Ray workers and other processes (measured: 0.06 s vs 4.6 s per tiny UNet forward under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Serve kills a proxy actor that is not ready within 5 s (and fails serve.start with ActorDiedError); starting a
# worker process takes longer than that on a loaded 2-core machine. Ray workers and CLI children inherit these.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
# Ray Train V2's controller polls its workers every 2 s (so a finished run waits ~2-4 s to be noticed) and starts a
# preemption watcher actor per run. Every training test pays that; measured on a 2-step toy run: 21 s -> 13 s.
# Training itself is unchanged (the suite has no spot instances to be preempted from).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")

import sys  # noqa: E402

import pytest  # noqa: E402

from pipeline.context import StageContext  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """OMP_NUM_THREADS=1 (above) gives torch one thread; a test that raised it (an in-process training run sets
    cpus_per_worker threads) must not slow every later test down."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _seeded_mlflow_stores(tmp_path_factory):
    """New MLflow SQLite stores in this process start as a copy of one migrated empty store (tests/mlflow_template.py);
    the CLI helpers seed their children's stores the same way."""
    from tests import mlflow_template

    mlflow_template.make_template(str(tmp_path_factory.mktemp("mlflow-template")))
    with pytest.MonkeyPatch.context() as monkeypatch:
        mlflow_template.install(monkeypatch)
        yield


@pytest.fixture(scope="session")
def tiny_components():
    """The tiny preset's base and refiner UNets, VAE and text encoders at seed 0 (random weights, eval mode), built
    once for every test that only reads them."""
    from sdxl.models import build_components

    return build_components("tiny", kind="both", seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole test session (starting Ray costs seconds on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def make_ctx(tmp_path):
    """A StageContext rooted in a temporary folder, without tracking."""

    def _make(stage: str, root: str | None = None, dataset: str = "default") -> StageContext:
        return StageContext(root=str(root or tmp_path / "root"), stage=stage, dataset=dataset)

    return _make


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) on 127.0.0.1 for the session; yields the env that points clients at it.

    pyarrow, boto3 and MLflow all honour AWS_ENDPOINT_URL, so the same `s3://` URIs a cluster uses work here.
    """
    from moto.server import ThreadedMotoServer

    from tests.ports import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"port": port, "env": env}
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; yields its s3:// URI."""
    import uuid

    import boto3

    name = f"sdxl-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["env"]["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"
