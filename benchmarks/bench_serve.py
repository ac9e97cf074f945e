"""Ray Serve app on loopback with the tiny preset: what batching buys, and what Serve costs per request.

1. Throughput at a fixed concurrency (``CONCURRENCY`` clients, each sending requests back to back) with the
   configured batching (``MAX_BATCH``) against batch size 1 on the *same* running app (``set_batching`` through
   handles), plus p50/p95 latency of each. Goal: batched / unbatched ≥ 1.5.
2. Request overhead: one request at a time over HTTP (batch size 1, so no batch wait) against the same work called
   in-process through the serving core (text encoders → base sampler → VAE → PNG) on the same weights, both with one
   torch thread per model. Goal: Serve / in-process ≤ 1.10. Also reported: the seconds Serve adds around the
   replicas' own compute (request time minus the replicas' recorded batch seconds), which separates the
   framework's cost from compute slowed by a busy machine.

Bounded in time (well under 2 minutes after Serve is up). Run: ``python benchmarks/bench_serve.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

CONCURRENCY = 8
ROUNDS = 3  # requests per client in each throughput run
MAX_BATCH = 8
THROUGHPUT_BODY = {"prompt": "a small red house by a lake", "width": 64, "height": 64, "steps": 8}
OVERHEAD_BODY = {"prompt": "a small red house by a lake", "width": 128, "height": 128, "steps": 20}
OVERHEAD_REPEATS = 5
GOAL_BATCH_SPEEDUP = 1.5
GOAL_OVERHEAD_RATIO = 1.10
BATCHED = ("TextEncoder", "BaseSampler", "Refiner", "Decoder")


def _config(port: int, root: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "serve": OmegaConf.load(os.path.join(_REPO, "pipeline", "conf", "serve", "default.yaml")),
        "model": {"preset": "tiny"}, "train": {"seed": 0}, "paths": {"root": root}, "mlflow": {"tracking_uri": None},
    })
    s = cfg.serve
    s.port, s.app_name, s.blocking, s.torch_threads = port, "sdxl-bench", False, 1
    s.batching.max_batch_size, s.batching.batch_wait_timeout_s = MAX_BATCH, 0.05
    s.refiner_ensemble = False  # the benchmark never uses the refiner: no second base UNet to load
    for name in s.deployments:
        s.deployments[name].ray_actor_options = {"num_cpus": 0.1}
    return cfg


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> float:
    import requests

    started = time.perf_counter()
    resp = requests.post(f"{url}/generate", json=body, timeout=120)
    if resp.status_code != 200:
        raise RuntimeError(f"benchmark request failed: HTTP {resp.status_code} {resp.text[:300]}")
    return time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _set_batching(app_name: str, max_batch_size: int, wait_s: float) -> None:
    from ray import serve

    for name in BATCHED:
        serve.get_deployment_handle(name, app_name=app_name).set_batching.remote(max_batch_size, wait_s).result()


def _throughput(url: str) -> dict:
    def client(index: int) -> list[float]:
        return [_post(url, {**THROUGHPUT_BODY, "seed": 1000 * index + r}) for r in range(ROUNDS)]

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        latencies = [lat for per_client in pool.map(client, range(CONCURRENCY)) for lat in per_client]
    elapsed = time.perf_counter() - started
    return {"rps": len(latencies) / elapsed, "p50_s": _percentile(latencies, 0.5),
            "p95_s": _percentile(latencies, 0.95)}


def in_process_generator(cfg):
    """The serving core without Serve, on the weights ``cfg.serve`` names (loaded as the replicas load them): a
    function from a request body to the first image, [H, W, 3] uint8, as the app would return it (refiner=false)."""
    import torch

    from stages.serve.app import ingress_settings
    from stages.serve.engine import BaseSamplerCore, DecoderCore, TextEncoderCore
    from stages.serve.loading import load_text_conditioners, load_unet, load_vae, sources_from_config
    from stages.serve.schema import parse_generate_request

    if cfg.serve.torch_threads:
        torch.set_num_threads(int(cfg.serve.torch_threads))
    sources = sources_from_config(cfg)
    text = TextEncoderCore(*load_text_conditioners(sources))
    base = BaseSamplerCore(load_unet(sources, "base"), sources.latent_downsample())
    decoder = DecoderCore(load_vae(sources))
    settings = ingress_settings(cfg)  # the app's own limits and defaults

    def generate(body: dict):
        req = parse_generate_request(body, settings["limits"], settings["defaults"])
        if req.refiner:
            raise ValueError("in_process_generator serves refiner=false requests only")
        latents = base.sample([(req, text.encode([req])[0])])[0]
        return decoder.decode([latents])[0][0]

    return generate


def _in_process_runner(cfg):
    """Seconds of one request through the serving core in-process (same weights, same request, PNG encoding)."""
    from stages.serve.engine import encode_image

    generate = in_process_generator(cfg)

    def once(seed: int) -> float:
        started = time.perf_counter()
        encode_image(generate({**OVERHEAD_BODY, "seed": seed}), "png")
        return time.perf_counter() - started

    return once


def _replica_compute_seconds(app_name: str) -> list[float]:
    """Per request, the seconds the model replicas spent computing it (sum over deployments; batch size 1)."""
    from ray import serve

    per_deployment = [serve.get_deployment_handle(name, app_name=app_name).batch_seconds.remote().result()
                      for name in ("TextEncoder", "BaseSampler", "Decoder")]
    return [sum(parts) for parts in zip(*per_deployment)]


def _overhead(url: str, cfg) -> tuple[float, float, float]:
    """Median seconds per request (served, in-process) measured alternately so machine load hits both alike, and
    the median of what Serve adds around the replicas' compute (HTTP, proxy, ingress, four handle hops)."""
    from ray import serve

    in_process = _in_process_runner(cfg)
    _post(url, {**OVERHEAD_BODY, "seed": 0})  # warm-ups
    in_process(0)
    for name in BATCHED:
        serve.get_deployment_handle(name, app_name=cfg.serve.app_name).reset_batch_sizes.remote().result()
    served, local = [], []
    for seed in range(1, OVERHEAD_REPEATS + 1):
        served.append(_post(url, {**OVERHEAD_BODY, "seed": seed}))
        local.append(in_process(seed))
    compute = _replica_compute_seconds(cfg.serve.app_name)
    fixed = statistics.median(total - inner for total, inner in zip(served, compute))
    return statistics.median(served), statistics.median(local), fixed


def main() -> dict:
    import ray
    from ray import serve

    from stages.serve.app import start

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = _config(_free_port(), tempfile.mkdtemp(prefix="bench-serve-"))
    t0 = time.perf_counter()
    try:
        url = start(cfg)
        startup_s = time.perf_counter() - t0
        _post(url, {**THROUGHPUT_BODY, "seed": 0})  # warm-up
        batched = _throughput(url)
        _set_batching(cfg.serve.app_name, 1, 0.0)
        unbatched = _throughput(url)
        served, in_process, fixed = _overhead(url, cfg)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    speedup = batched["rps"] / unbatched["rps"]
    overhead = served / in_process
    return {
        "concurrency": CONCURRENCY,
        "requests_per_run": CONCURRENCY * ROUNDS,
        "max_batch_size": MAX_BATCH,
        "throughput_batched_rps": round(batched["rps"], 3),
        "throughput_batch1_rps": round(unbatched["rps"], 3),
        "batching_speedup": round(speedup, 3),
        "batching_goal": f">= {GOAL_BATCH_SPEEDUP}",
        "batching_goal_met": speedup >= GOAL_BATCH_SPEEDUP,
        "latency_batched_p50_s": round(batched["p50_s"], 4),
        "latency_batched_p95_s": round(batched["p95_s"], 4),
        "latency_batch1_p50_s": round(unbatched["p50_s"], 4),
        "latency_batch1_p95_s": round(unbatched["p95_s"], 4),
        "single_request_serve_s": round(served, 4),
        "single_request_in_process_s": round(in_process, 4),
        "serve_overhead_ratio": round(overhead, 3),
        "serve_added_s_per_request": round(fixed, 4),
        "serve_added_fraction": round(fixed / in_process, 3),
        "overhead_goal": f"<= {GOAL_OVERHEAD_RATIO}",
        "overhead_goal_met": overhead <= GOAL_OVERHEAD_RATIO,
        "serve_startup_s": round(startup_s, 1),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
