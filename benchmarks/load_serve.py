"""A bounded loopback load test of the Serve app: fixed concurrency for a fixed time.

``concurrency`` client threads each send ``POST /generate`` back to back until ``duration_s`` has passed; the result
is the throughput (successful requests per second), p50/p95/p99 latency of the successful requests, and the errors by
HTTP status (0 = no answer: refused, reset, timed out). Against a running app (``--url http://127.0.0.1:8000``) or,
without one, an app started here on an embedded 2-CPU Ray at the tiny preset on a free loopback port (random
weights), torn down afterwards. Bounded: every request has a timeout and the run stops after ``duration_s`` plus at
most one request timeout.

    python benchmarks/load_serve.py [--url URL] [--concurrency 4] [--duration 20]

The same :class:`LoadGenerator` drives the serving fault test (tests/cluster/test_serve_faults.py) and benchmark
(benchmarks/bench_serve_fault.py); ``python benchmarks/run.py load`` records this test's figures in RESULTS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# Small enough that a CPU replica answers in about a second at the tiny preset.
DEFAULT_BODY = {"prompt": "a red circle on a blue background", "width": 32, "height": 32, "steps": 2, "seed": 0}
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Sample:
    """One request: when it started (seconds since the load began), how long it took, its HTTP status (0: none)."""

    start_s: float
    latency_s: float
    status: int


def post_json(url: str, body: dict, timeout_s: float) -> int:
    """HTTP status of a JSON POST; 0 when no answer came (connection refused or reset, timeout)."""
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, http.client.HTTPException):
        return 0


class LoadGenerator:
    """``concurrency`` threads sending requests back to back from :meth:`start` until :meth:`stop` or the deadline."""

    def __init__(self, url: str, concurrency: int, body: dict | None = None, duration_s: float | None = None,
                 timeout_s: float = REQUEST_TIMEOUT_S):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if duration_s is not None and duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {duration_s}")
        self.endpoint = url.rstrip("/") + "/generate"
        self.concurrency, self.body = concurrency, body or DEFAULT_BODY
        self.duration_s, self.timeout_s = duration_s, timeout_s
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started_at = 0.0
        self.stopped_at = 0.0

    def _client(self) -> None:
        while not self._stop.is_set():
            if self.duration_s is not None and time.monotonic() - self.started_at >= self.duration_s:
                return
            begin = time.monotonic()
            status = post_json(self.endpoint, self.body, self.timeout_s)
            sample = Sample(begin - self.started_at, time.monotonic() - begin, status)
            with self._lock:
                self.samples.append(sample)
            if status == 0:
                time.sleep(0.1)  # nothing is listening: don't spin on refused connections

    def start(self) -> "LoadGenerator":
        self.started_at = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True, name=f"load-{i}")
                         for i in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Sample]:
        """Stop the clients (each finishes its request in flight, bounded by the request timeout)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)
        self.stopped_at = time.monotonic()
        with self._lock:
            return list(self.samples)

    def wait(self) -> list[Sample]:
        """Block until the duration is over (``duration_s`` set), then stop."""
        if self.duration_s is None:
            raise ValueError("wait() needs a duration_s; use stop() for an open-ended run")
        for thread in self._threads:
            thread.join(timeout=self.duration_s + self.timeout_s + 5)
        return self.stop()

    def elapsed_s(self) -> float:
        return (self.stopped_at or time.monotonic()) - self.started_at


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(samples: list[Sample], elapsed_s: float, concurrency: int) -> dict:
    ok = [s.latency_s for s in samples if s.status == 200]
    errors = Counter(str(s.status) for s in samples if s.status != 200)
    return {
        "concurrency": concurrency,
        "seconds": round(elapsed_s, 3),
        "requests": len(samples),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_status": dict(sorted(errors.items())),
        "throughput_rps": round(len(ok) / elapsed_s, 4) if elapsed_s > 0 else 0.0,
        "latency_p50_s": _round(percentile(ok, 50)),
        "latency_p95_s": _round(percentile(ok, 95)),
        "latency_p99_s": _round(percentile(ok, 99)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def run_load(url: str, concurrency: int, duration_s: float, body: dict | None = None) -> dict:
    generator = LoadGenerator(url, concurrency, body, duration_s=duration_s).start()
    samples = generator.wait()
    return summarize(samples, generator.elapsed_s(), concurrency)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def self_started_app(num_cpus: int = 2, base_replicas: int = 1, app_name: str = "sdxl-load") -> Iterator[str]:
    """The tiny-preset app (random weights, ``base_replicas`` BaseSampler replicas) on an embedded Ray and a free
    loopback port; yields its URL."""
    import ray
    from omegaconf import OmegaConf
    from ray import serve

    from stages.serve.app import start

    serve_cfg = OmegaConf.load(os.path.join(_REPO, "pipeline", "conf", "serve", "default.yaml"))
    cfg = OmegaConf.create({"serve": serve_cfg, "model": {"preset": "tiny"}, "train": {"seed": 0},
                            "paths": {"root": os.path.join(_REPO, "outputs")}, "mlflow": {"tracking_uri": None}})
    s = cfg.serve
    s.port, s.app_name, s.blocking, s.torch_threads, s.refiner_ensemble = _free_port(), app_name, False, 1, False
    s.deployments.base.num_replicas = base_replicas
    for name in s.deployments:
        s.deployments[name].ray_actor_options = {"num_cpus": 0.1}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield start(cfg)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def main(url: str | None = None, concurrency: int = 4, duration_s: float = 20.0, body: dict | None = None) -> dict:
    """Load ``url`` (or a self-started app) at ``concurrency`` for ``duration_s``; the summary as a dict."""
    if url:
        return {"url": url, "self_started": False, **run_load(url, concurrency, duration_s, body)}
    with self_started_app() as started:
        return {"url": started, "self_started": True, **run_load(started, concurrency, duration_s, body)}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running app, e.g. http://127.0.0.1:8000 (default: start one)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse_args(None)
    print(json.dumps(main(args.url, args.concurrency, args.duration), indent=2))
