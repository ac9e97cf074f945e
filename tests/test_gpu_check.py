"""benchmarks/gpu_check.py: its CPU path (tiny preset) end to end through the CLI, the batch search, the peak table,
and the one-GPU Serve config its CUDA path uses (the Serve timing itself: tests/serve/test_gpu_check_serve.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check_serve import GPU_SHARES, serve_check_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a Python start plus every section at the tiny preset: ~25 s of the fast subset on 2 cores
def test_cli_runs_every_section_on_cpu_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--skip-serve"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["settings"]["preset"] == "tiny"
    from benchmarks.flops import unet_forward_flops

    assert report["train"]["forward_tflop_per_sample"] == pytest.approx(unet_forward_flops("tiny", "base", 32) / 1e12,
                                                                         rel=1e-3)
    for name in ("checkpointing_off", "checkpointing_on"):
        run = report["train"]["runs"][name]
        best = run["largest"]
        assert best["batch"] == report["settings"]["max_batch"]
        assert best["activation_checkpointing"] == (name == "checkpointing_on")
        assert best["samples_per_s"] > 0 and math.isfinite(best["loss"]) and best["loss"] > 0
        assert run["mfu"] is None  # no bf16 peak for a CPU
        assert 0 < run["plan_comparable_gb"] < run["plan_total_gb"]
    sampler = report["sampler"]
    assert sampler["refiner_steps"] >= 1 and sampler["base_plus_refiner_s"] > sampler["base_s"] > 0
    assert sampler["vae_decode_fp32_s"] > 0
    assert report["serve"] == {"skipped": "--skip-serve"}
    markdown = (out / "gpu_check.md").read_text()
    for heading in ("## Training", "## Sampling", "## Serving"):
        assert heading in markdown
    assert markdown in proc.stdout


def test_peak_table_prefers_the_specific_name():
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_bf16_tflops("Some Future GPU") is None


@pytest.mark.parametrize("limit, plan_fits, expected_tries, expected_best", [
    (12, 4, [4, 8, 16], 8),     # the plan's guess fits: double until out of memory
    (3, 8, [8, 4, 2], 2),       # the guess does not fit: halve until it does
    (0, 2, [2, 1], None),       # nothing fits
])
def test_batch_search_doubles_until_oom_or_halves_until_it_fits(monkeypatch, limit, plan_fits, expected_tries,
                                                                 expected_best):
    def trial(settings, batch, checkpointing):
        if batch > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"batch": batch, "samples_per_s": float(batch)}

    monkeypatch.setattr(gpu_check, "train_trial", trial)
    # Memory is released after every trial; recorded here instead of a gc.collect() of the whole test process's heap.
    freed = []
    monkeypatch.setattr(gpu_check, "_free", freed.append)
    monkeypatch.setattr(gpu_check, "plan_for", lambda s, batch, ckpt, gb: {"fits": batch <= plan_fits})
    settings = gpu_check.Settings("cpu", "tiny", 64, 5, 1, 2, 256, 60.0)
    best, tried = gpu_check.largest_batch(settings, False, 80.0, deadline=float("inf"))
    assert [t["batch"] for t in tried] == expected_tries
    assert (best or {}).get("batch") == expected_best
    assert [bool(t.get("oom")) for t in tried] == [t["batch"] > limit for t in tried]
    assert freed == [torch.device("cpu")] * len(tried)


def test_the_cuda_serve_config_shares_one_gpu_and_accepts_the_check_request(tmp_path):
    from stages.serve.app import ingress_settings
    from stages.serve.schema import parse_generate_request

    cfg = serve_check_config("full", "cuda", 8123, str(tmp_path))
    deployments = cfg.serve.deployments
    assert sum(float(deployments[name].ray_actor_options.num_gpus) for name in deployments) <= 1.0
    assert {name: deployments[name].ray_actor_options.num_gpus for name in GPU_SHARES} == GPU_SHARES
    assert cfg.serve.dtype == "bfloat16" and cfg.serve.host == "127.0.0.1" and not cfg.serve.refiner_ensemble
    assert cfg.model.preset == "full" and not cfg.serve.blocking
    settings = ingress_settings(cfg)
    for refiner in (False, True):
        body = {"prompt": "a horse", "width": 1024, "height": 1024, "steps": 30, "seed": 0, "refiner": refiner}
        request = parse_generate_request(body, settings["limits"], settings["defaults"])
        assert (request.width, request.height, request.steps, request.refiner) == (1024, 1024, 30, refiner)


def test_out_of_memory_is_recognised_in_its_several_forms():
    assert gpu_check.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert gpu_check.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not gpu_check.is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
