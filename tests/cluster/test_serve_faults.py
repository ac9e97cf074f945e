"""A Serve replica process dies under load: Serve starts a replacement, and requests after recovery succeed.

`stage=serve` joins a private Ray head (as on a cluster), with two BaseSampler replicas; load runs at a fixed
concurrency (benchmarks/load_serve.py); one BaseSampler replica's process, found through Ray's state API, is
SIGKILLed. The requests that failed during the gap are counted and reported (written to serve_fault_report.json and
printed), not asserted to be zero.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from benchmarks.load_serve import LoadGenerator, summarize
from tests.cluster.helpers import SMALL_REQUEST, http_status, require_stage, start_serve, stop_tree, wait_for
from tests.cluster.ray_head import RayHead

pytestmark = [pytest.mark.slow, pytest.mark.integration]
APP = "sdxl"
REPLICA_CLASS = f"ServeReplica:{APP}:BaseSampler"
CONCURRENCY = 2
RECOVERY_TIMEOUT_S = 240
AFTER_RECOVERY_REQUESTS = 4


def _base_replicas(head: RayHead) -> dict[str, int]:
    """ALIVE BaseSampler replica actors of the app: actor id → pid (state API on the head's dashboard)."""
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard_url, filters=[("class_name", "=", REPLICA_CLASS),
                                                              ("state", "=", "ALIVE")], timeout=30)
    return {a.actor_id: a.pid for a in actors if a.pid}


@pytest.fixture
def serving_head(tmp_path):
    require_stage("serve")
    head = RayHead(num_cpus=2, log_dir=tmp_path)
    proc = None
    try:
        head.start()
        env = {**head.env(), "RAY_ADDRESS": head.address}
        proc, url = start_serve([f"paths.root={tmp_path / 'root'}", f"serve.app_name={APP}",
                                 "serve.deployments.base.num_replicas=2", "serve.refiner_ensemble=false"],
                                tmp_path / "serve.log", env)
        yield head, url
    finally:
        if proc is not None:
            # Nothing here needs the app's clean shutdown (the head goes next): the default 30 s of grace was all
            # spent waiting for it.
            stop_tree(proc, grace_s=3)
        head.stop()


def test_killed_replica_is_replaced_and_requests_recover(serving_head, tmp_path):
    head, url = serving_head
    before = wait_for(lambda: (r := _base_replicas(head)) and len(r) == 2 and r, 120, "two ALIVE BaseSampler replicas")
    status, body, _ = http_status(f"{url}/generate", SMALL_REQUEST, timeout_s=120)
    assert status == 200, body[:300]

    load = LoadGenerator(url, CONCURRENCY, SMALL_REQUEST, timeout_s=60).start()
    try:
        time.sleep(5.0)  # steady load before the fault
        victim_id, victim_pid = sorted(before.items())[0]
        assert victim_pid in {p.pid for p in head.own_processes()}, "the replica is not a process of our head"
        killed_at = time.monotonic() - load.started_at
        os.kill(victim_pid, signal.SIGKILL)
        replaced = wait_for(
            lambda: (r := _base_replicas(head)) and len(r) == 2 and victim_id not in r and r,
            RECOVERY_TIMEOUT_S, "Serve to replace the killed BaseSampler replica", interval_s=1.0)
        recovered_at = time.monotonic() - load.started_at
        time.sleep(3.0)  # load continues on the recovered app
    finally:
        samples = load.stop()

    assert victim_pid not in replaced.values()
    after = [http_status(f"{url}/generate", SMALL_REQUEST, timeout_s=120)[0] for _ in range(AFTER_RECOVERY_REQUESTS)]
    assert after == [200] * AFTER_RECOVERY_REQUESTS, after
    assert http_status(f"{url}/health", timeout_s=30)[0] == 200

    in_gap = [s for s in samples if killed_at <= s.start_s + s.latency_s and s.start_s <= recovered_at]
    report = {
        "killed_pid": victim_pid, "killed_at_s": round(killed_at, 2), "recovered_at_s": round(recovered_at, 2),
        "gap_s": round(recovered_at - killed_at, 2), "gap_requests": len(in_gap),
        "gap_failed_requests": sum(s.status != 200 for s in in_gap),
        "whole_run": summarize(samples, load.elapsed_s(), CONCURRENCY),
    }
    (tmp_path / "serve_fault_report.json").write_text(json.dumps(report, indent=2))
    print("serve fault report:", json.dumps(report))
    assert report["whole_run"]["ok"] > 0, report  # the load reached the app
