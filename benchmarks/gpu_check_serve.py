"""The Serve part of benchmarks/gpu_check.py (latency of one request) and the check's markdown report.

On one GPU the app's deployments share it: fractional ``num_gpus`` summing to 0.9 (text encoders 0.1, base 0.4,
refiner 0.3, decoder 0.1), bf16 UNets, no ensemble-of-experts base copy on the refiner replica; random weights
(``serve.checkpoint`` unset), which serve exactly as fast as trained ones.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SHARES = {"text_encoder": 0.1, "base": 0.4, "refiner": 0.3, "decoder": 0.1}
CPU_SHARES = {"ingress": 0.1, "text_encoder": 1, "base": 2, "refiner": 2, "decoder": 1}
APP_NAME = "gpu-check"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_check_config(preset: str, device: str, port: int, root: str):
    """The pipeline's config for ``stage=serve`` at ``preset``, resized to share one GPU (or a few CPU slots)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    overrides = [f"preset={preset}", "stage=serve", f"paths.root={root}", "serve.blocking=false",
                 "serve.host=127.0.0.1", f"serve.port={port}", f"serve.app_name={APP_NAME}",
                 "serve.refiner_ensemble=false", f"serve.dtype={'bfloat16' if device == 'cuda' else 'float32'}"]
    with initialize_config_dir(config_dir=os.path.join(_REPO, "pipeline", "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        for name, cpus in CPU_SHARES.items():
            gpus = GPU_SHARES.get(name, 0) if device == "cuda" else 0
            cfg.serve.deployments[name].ray_actor_options = {"num_cpus": cpus if device == "cuda" else 0.1,
                                                             "num_gpus": gpus}
    return cfg


def serve_latency(url: str, body: dict, timeout_s: float = 600) -> dict:
    """Seconds of one ``POST /generate`` after a warm-up request, and the server's own per-stage timings."""
    import requests

    warm = requests.post(f"{url}/generate", json=body, timeout=timeout_s)
    if warm.status_code != 200:
        raise RuntimeError(f"warm-up request failed: HTTP {warm.status_code} {warm.text[:300]}")
    start = time.perf_counter()
    resp = requests.post(f"{url}/generate", json={**body, "seed": int(body.get("seed", 0)) + 1}, timeout=timeout_s)
    latency = time.perf_counter() - start
    if resp.status_code != 200 or resp.headers.get("content-type") != "image/png":
        raise RuntimeError(f"request failed: HTTP {resp.status_code} {resp.text[:300]}")
    return {"latency_s": round(latency, 3), "server_timings": json.loads(resp.headers.get("X-Timings", "{}"))}


def serve_section(s) -> dict:
    """Start the app on an embedded Ray, time one request at the check's size (base, then base + refiner)."""
    import ray
    from ray import serve

    from stages.serve.app import start

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1) if s.device == "cuda" else 2,
                 num_gpus=1 if s.device == "cuda" else 0, include_dashboard=False, log_to_driver=False)
    body = {"prompt": "a photograph of an astronaut riding a horse", "width": s.resolution, "height": s.resolution,
            "steps": s.sampler_steps, "seed": 0, "refiner": False}
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-serve-") as root:
            cfg = serve_check_config(s.preset, s.device, _free_port(), root)
            t0 = time.perf_counter()
            url = start(cfg)
            startup_s = time.perf_counter() - t0
            base = serve_latency(url, body)
            refined = serve_latency(url, {**body, "refiner": True})
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return {"startup_s": round(startup_s, 1), "request": {k: v for k, v in body.items() if k != "prompt"},
            "base": base, "base_plus_refiner": refined}


def _row(name: str, value) -> str:
    return f"| {name} | {value if value is not None else '—'} |"


def report_markdown(report: dict, goal_mfu: float, goal_memory_error: float) -> str:
    s = report["settings"]
    memory = f" ({report['gpu_memory_gb']} GB)" if report["gpu_memory_gb"] else ""
    lines = [
        "# GPU check",
        "",
        f"Written by `python benchmarks/gpu_check.py` on {report['device']}{memory}, torch "
        f"{report['torch']}, {report['started_at']}, in {report['wall_s']} s: preset `{s['preset']}` at "
        f"{s['resolution']}², bf16 on CUDA. Goals: MFU ≥ {goal_mfu:.0%}, peak memory within "
        f"{goal_memory_error:.0%} of the `train.dry_run` plan.",
        "",
        "## Training (base UNet, FSDP2 on one rank, AdamW + EMA)",
        "",
        f"Forward {report['train']['forward_tflop_per_sample']} TFLOP per sample (benchmarks/flops.py); peak "
        f"{report['train']['peak_bf16_tflops'] or 'unknown (no MFU)'} TFLOP/s bf16.",
        "",
        "| activation checkpointing | largest batch | samples/s | MFU | peak allocated GB | plan GB (states + "
        "activations) | memory error | tried |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in report["train"]["runs"].items():
        best = run.get("largest") or {}
        tried = ", ".join(f"{t['batch']}{' OOM' if t.get('oom') else ''}" for t in run["tried"])
        mfu = run.get("mfu")
        error = run.get("memory_error")
        lines.append(f"| {name.split('_')[-1]} | {best.get('batch', '—')} | {best.get('samples_per_s', '—')} | "
                     f"{f'{mfu:.1%}' if mfu is not None else '—'} | {best.get('peak_allocated_gb', '—')} | "
                     f"{run.get('plan_comparable_gb', '—')} | {f'{error:+.1%}' if error is not None else '—'} | "
                     f"{tried} |")
    sm = report["sampler"]
    lines += ["", "## Sampling (batch 1)", "", "| figure | seconds |", "|---|---|",
              _row(f"base, {sm['steps']} steps ({sm['unet_dtype']})", sm["base_s"]),
              _row(f"base + refiner (SDEdit strength {sm['refiner_strength']}, {sm['refiner_steps']} refiner steps)",
                   sm["base_plus_refiner_s"]),
              _row("VAE decode, float32", sm["vae_decode_fp32_s"]), "", "## Serving (one request)", ""]
    sv = report["serve"]
    if "skipped" in sv:
        lines.append(f"Skipped ({sv['skipped']}).")
    else:
        lines += [f"App start-up {sv['startup_s']} s; request {json.dumps(sv['request'])}.", "",
                  "| request | latency s | server timings |", "|---|---|---|",
                  f"| base | {sv['base']['latency_s']} | {json.dumps(sv['base']['server_timings'])} |",
                  f"| base + refiner | {sv['base_plus_refiner']['latency_s']} | "
                  f"{json.dumps(sv['base_plus_refiner']['server_timings'])} |"]
    return "\n".join(lines) + "\n"
