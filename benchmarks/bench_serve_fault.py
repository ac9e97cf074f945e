"""A BaseSampler replica dies under load: how many requests fail while Serve replaces it.

The self-started tiny app (benchmarks/load_serve.py) with two BaseSampler replicas on an embedded 2-CPU Ray takes
``CONCURRENCY`` clients of load; after ``STEADY_S`` of steady load one replica actor is killed with ``ray.kill`` (a
forced kill: its worker process exits at once, as on a crash, with requests in flight). Recovery is when a new
replica exists and Serve reports two RUNNING BaseSampler replicas again, the killed one not among them. Reported: the gap, the requests that
overlapped it and how many of those failed, the whole run's summary, and whether requests after recovery succeed.
tests/cluster/test_serve_faults.py does the same through the CLI on a private Ray head with SIGKILL.

Run: ``python benchmarks/run.py serve_fault`` (RESULTS.md § serve_fault) or ``python benchmarks/bench_serve_fault.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

APP = "sdxl-fault"
DEPLOYMENT = "BaseSampler"
CONCURRENCY = 2
STEADY_S = 5.0
AFTER_RECOVERY_S = 3.0
RECOVERY_TIMEOUT_S = 600.0  # a replica start took minutes on a 2-core machine under heavy load


def replica_actor_names(app: str = APP, deployment: str = DEPLOYMENT) -> set[str]:
    """Names of the replica actors of ``deployment`` (Serve names them ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def running_replicas(app: str = APP, deployment: str = DEPLOYMENT) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))


def _wait(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)
    return value


def _replaced(before: set[str], victim: str) -> bool:
    """The victim is gone, a replica that was not there before exists, and Serve reports two RUNNING replicas (Serve's
    own status alone lags a replica's death by up to a health-check period)."""
    names = replica_actor_names()
    return victim not in names and bool(names - before) and running_replicas() == 2


def kill_one_replica_under_load(url: str) -> dict:
    import ray

    from benchmarks.load_serve import DEFAULT_BODY, LoadGenerator, post_json, summarize

    before = _wait(lambda: running_replicas() == 2 and replica_actor_names(), 120, "two RUNNING replicas")
    load = LoadGenerator(url, CONCURRENCY, DEFAULT_BODY).start()
    try:
        time.sleep(STEADY_S)
        victim = sorted(before)[0]
        killed_at = time.monotonic() - load.started_at
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        _wait(lambda: _replaced(before, victim), RECOVERY_TIMEOUT_S, "Serve to replace the killed replica")
        recovered_at = time.monotonic() - load.started_at
        time.sleep(AFTER_RECOVERY_S)
    finally:
        samples = load.stop()
    after = [post_json(url + "/generate", DEFAULT_BODY, 60) for _ in range(4)]
    in_gap = [s for s in samples if killed_at <= s.start_s + s.latency_s and s.start_s <= recovered_at]
    return {
        "setup": f"tiny preset, 2 {DEPLOYMENT} replicas, concurrency {CONCURRENCY}, one replica killed with ray.kill "
                 f"after {STEADY_S:g} s of load",
        "killed_at_s": round(killed_at, 2), "recovered_at_s": round(recovered_at, 2),
        "gap_s": round(recovered_at - killed_at, 2), "gap_requests": len(in_gap),
        "gap_failed_requests": sum(s.status != 200 for s in in_gap),
        "gap_failed_by_status": sorted({str(s.status) for s in in_gap if s.status != 200}),
        "after_recovery_ok": sum(status == 200 for status in after), "after_recovery_sent": len(after),
        "whole_run": summarize(samples, load.elapsed_s(), CONCURRENCY),
    }


def main() -> dict:
    from benchmarks.load_serve import self_started_app

    with self_started_app(base_replicas=2, app_name=APP) as url:
        return kill_one_replica_under_load(url)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
