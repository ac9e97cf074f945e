"""Object storage goes away during shard writes: `stage=data` on an s3:// root loses its S3 server (a moto server
this test starts in a thread, so it can stop it and start it again on the same port with the same buckets) while
parts are being written. The run must fail cleanly (an error naming the storage problem, no hang) or ride the outage
out with retries; either way a re-run recovers, and every part a listing shows is a complete, readable object.

The outage must really hit a running stage: the stage process is alive when the server stops, and the finished
dataset holds more objects than the bucket did at that moment (writes were still to come).
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from tests.cluster.helpers import (
    TINY_DATA,
    check_dataset,
    check_parts_readable,
    child_env,
    demo_keys,
    free_port,
    kill_tree,
    log_tail,
    make_demo_source,
    mlflow_runs,
    run_stage,
    start_stage,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]
N_IMAGES = 24
PARTS_BEFORE_OUTAGE = 3
OUTAGE_S = 15
FINISH_TIMEOUT_S = 300
# What a lost S3 endpoint looks like in pyarrow's/boto's error text.
STORAGE_FAILURE = r"(?i)AWS Error|curl|could not connect|connection (refused|reset|error)|endpoint"


class RestartableS3:
    """moto's S3 server in a thread on a fixed loopback port. Its buckets live in moto's in-process backend, so they
    survive a stop()/start() of the server: like an S3 endpoint that drops off the network and comes back."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10))


@pytest.fixture
def s3(monkeypatch):
    server = RestartableS3()
    server.start()
    # This test process reads the results through pipeline.storage (pyarrow), which takes the endpoint from the env.
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()


def _output_keys(s3: RestartableS3, bucket: str, prefix: str) -> list[str]:
    """Objects the stage has written under ``prefix``, its plan excepted ([] while the server is down)."""
    try:
        pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    except Exception:  # noqa: BLE001 - the server is restarting: no listing yet
        return []
    return [k for k in keys if "/plan/" not in k]


def test_s3_outage_during_writes_fails_cleanly_or_retries_and_rerun_recovers(s3, tmp_path):
    bucket = f"sdxl-outage-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/root"
    source = make_demo_source(tmp_path / "src", N_IMAGES)
    home = tmp_path / "home"
    home.mkdir()
    env = child_env({**s3.env(), "HOME": str(home)})
    args = [*TINY_DATA, f"paths.root={root}", f"ingest.source={source}", "ingest.chunk_size=1"]
    log = tmp_path / "data.log"

    dataset_prefix = "root/data/default/"
    proc = start_stage("data", args, log, env)
    try:
        wait_for(lambda: len(_output_keys(s3, bucket, dataset_prefix)) >= PARTS_BEFORE_OUTAGE, 300,
                 f"{PARTS_BEFORE_OUTAGE} objects written under {dataset_prefix}", interval_s=0.1, proc=proc,
                 log_path=log)
        written_before_outage = len(_output_keys(s3, bucket, dataset_prefix))
        s3.stop()
        assert proc.poll() is None, f"the stage had ended (rc={proc.returncode}) before S3 stopped:\n{log_tail(log)}"
        outage_began = time.monotonic()
        while proc.poll() is None and time.monotonic() - outage_began < OUTAGE_S:
            time.sleep(0.5)
        s3.start()
        proc.wait(timeout=FINISH_TIMEOUT_S)  # no hang: it ends, failed or finished, within the bound
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    outcome = "retried and completed" if proc.returncode == 0 else "failed"
    print(f"s3 outage of up to {OUTAGE_S}s during the data pass: the run {outcome} (rc={proc.returncode})")

    tracking = f"sqlite:///{home / '.cache' / 'sdxl-pipeline' / 'mlflow.db'}"
    if proc.returncode != 0:
        # The terminal gets one line naming the storage failure; the traceback goes to the stage's run log (for an
        # s3:// root a local folder under ~/.cache/sdxl-pipeline/logs, see pipeline.logs.run_log_path).
        text = log_tail(log, 20000)
        error_lines = [line for line in text.splitlines() if line.startswith("error: stage=data failed")]
        assert len(error_lines) == 1, f"no one-line error for the failed stage:\n{text[-3000:]}"
        message, _, pointer = error_lines[0].partition("  (full trace in ")
        print("the failed run's error:", message[:400])
        assert re.search(STORAGE_FAILURE, message), error_lines[0]
        stage_log = home / ".cache" / "sdxl-pipeline" / "logs" / "data.log"
        assert pointer.startswith(str(stage_log)), f"the error line points at the run log: {error_lines[0]}"
        run_log = log_tail(stage_log, 200000)
        assert "Traceback (most recent call last)" in run_log, run_log[-3000:]
        last_trace = run_log[run_log.rindex("Traceback (most recent call last)"):]
        assert re.search(STORAGE_FAILURE, last_trace), last_trace[-3000:]
        assert [r.info.status for r in mlflow_runs(tracking, "data")] == ["FAILED"]
        run_stage("data", args, tmp_path / "rerun.log", env, FINISH_TIMEOUT_S).check()

    dataset = f"{root}/data/default"
    # A part and a rejects file per unit (chunk_size=1: one unit per image), each a complete object.
    assert check_parts_readable(f"{dataset}/work") == 2 * N_IMAGES
    assert check_parts_readable(f"{dataset}/manifest.parquet") > 0
    counts = check_dataset(dataset, demo_keys(source))
    assert counts["kept"] + counts["rejected"] == N_IMAGES
    assert len(_output_keys(s3, bucket, dataset_prefix)) > written_before_outage, "the outage came after the last write"
    assert mlflow_runs(tracking, "data")[0].info.status == "FINISHED"
