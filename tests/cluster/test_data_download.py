"""A URL list downloaded across a cluster: a private Ray head plus a second `ray start` node on this machine, the
`stage=data` driver joining it. The reader tasks (which download) run on both nodes; 404s, a timeout, an HTML page
and a slow host end as recorded rejects or kept samples exactly as on one machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster.helpers import child_env, run_stage
from tests.cluster.ray_head import RayHead, RayWorkerNode
from tests.data.test_url_ingest import TIMEOUT_S, ImageServer, check_url_dataset, url_entries, write_url_list

pytestmark = [pytest.mark.slow, pytest.mark.integration]
STAGE_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-cluster")
    head = RayHead(num_cpus=1, log_dir=logs)
    worker = RayWorkerNode(head, num_cpus=1, log_dir=logs)
    try:
        head.start()
        worker.start()
        yield head
    finally:
        worker.stop()
        head.stop()


def test_url_units_download_on_both_nodes(cluster, tmp_path):
    with ImageServer() as fast, ImageServer(0.3) as slow:
        entries = url_entries(fast.url, slow.url)
        url_list = write_url_list(tmp_path / "urls.jsonl", entries)
        root = tmp_path / "root"
        # Units of one URL, a reader task each: the two nodes' CPUs both take some.
        args = ["preset=tiny", f"ray.address={cluster.address}", f"paths.root={root}", f"ingest.source={url_list}",
                "ingest.chunk_size=1", f"ingest.download.timeout_s={TIMEOUT_S}", "ingest.download.retries=0",
                "ingest.download.threads=2"]
        run = run_stage("data", args, tmp_path / "data.log", env=child_env(cluster.env()), timeout_s=STAGE_TIMEOUT_S)
        summary = run.check()
    dataset = Path(summary["dataset_dir"])
    stats = check_url_dataset(dataset, entries, fast.url)
    assert stats["accounting"]["ok"] and stats["units"] == len(entries)
    nodes = stats["units_by_node"]
    assert len(nodes) == 2 and sum(nodes.values()) == len(entries), nodes
    assert "joining Ray cluster" in run.log
    assert json.loads((dataset / "plan" / "_plan.json").read_text())["source_kind"] == "urls"
