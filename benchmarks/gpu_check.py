"""One-shot GPU check: what the CPU machine cannot measure, in one command of a few minutes on one H100/H200.

    python benchmarks/gpu_check.py [--out benchmarks/gpu_check] [--budget-s 480] [--skip-serve] [--peak-tflops X]

On CUDA it uses the ``full`` preset at 1024²; on a CPU it runs the same functions with the ``tiny`` preset at 32² in
seconds (tests/test_gpu_check.py runs it in the suite, so it cannot rot). It writes ``gpu_check.json`` and
``gpu_check.md`` under ``--out``:

1. **Training**: base-UNet optimizer steps through the project's own strategy (stages/train/strategies.py: FSDP2
   ``fully_shard`` per wrap unit on a one-rank process group, bf16 params under autocast on CUDA, fused AdamW, grad
   clipping) plus the EMA update, exactly the calls of ``stages/train/loop.py``, on random latents and text
   embeddings (the cached-latents setting: the VAE and text encoders are not in the step). For activation checkpointing
   off and on: the largest power-of-two micro-batch that fits (starting from the ``train.dry_run`` plan's estimate),
   its samples/s, MFU = samples/s × 3 × forward FLOPs / peak bf16 FLOP/s (forward FLOPs from benchmarks/flops.py, the
   counter of docs/scale_model.md; peak from the device-name table below), and ``torch.cuda.max_memory_allocated``
   against the plan (stages/train/plan.py) without its frozen-model and fixed-overhead terms, which this step does not
   allocate.
2. **Sampling**: the base sampler for 30 steps, then base + refiner (SDEdit at the Serve default strength), and the
   float32 VAE decode, at batch 1.
3. **Serving**: the Ray Serve app (random weights, bf16 UNets) on 127.0.0.1, the latency of one request after a
   warm-up request.
Goals (issue 12): MFU ≥ 40%, measured peak memory within 10% of the plan.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first name contained in the device name
# wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))
GOAL_MFU = 0.40
GOAL_MEMORY_ERROR = 0.10
DEFAULT_OUT = os.path.join(_REPO, "benchmarks", "gpu_check")


@dataclass
class Settings:
    device: str
    preset: str
    resolution: int
    sampler_steps: int
    warmup_steps: int
    timed_steps: int
    max_batch: int
    budget_s: float

    @classmethod
    def for_device(cls, device: torch.device, budget_s: float) -> "Settings":
        if device.type == "cuda":
            return cls("cuda", "full", 1024, 30, 2, 4, 256, budget_s)
        return cls("cpu", "tiny", 32, 5, 1, 1, 2, budget_s)


def peak_bf16_tflops(device_name: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn):
    """(fn(), seconds) with the device synchronised around the call, so GPU work is inside the timing."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def one_rank_process_group(device: torch.device):
    """A world of one (nccl on CUDA, gloo on CPU) over loopback: FSDP2 needs a device mesh even on one GPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_random(preset: str, component: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """A randomly initialised UNet ("base" | "refiner") or VAE ("vae"), initialised directly on ``device`` (built on
    the meta device, then every module's own ``reset_parameters``): seconds on a GPU where a CPU init of 2.6B
    parameters takes a minute. The weights differ from ``sdxl.models``' seeded init; timings do not care."""
    from sdxl.models import build_unet, build_vae

    module = build_vae(preset, device="meta") if component == "vae" else build_unet(preset, component, device="meta")
    module = module.to_empty(device=device)
    with torch.no_grad():
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    return module if dtype == torch.float32 else module.to(dtype=dtype)


def random_conditioning(preset: str, kind: str, batch: int, device: torch.device, resolution: int):
    """(latents, Conditioning) of ``kind`` at ``resolution``²: random latents and text embeddings, real time ids."""
    from benchmarks.flops import unet_inputs
    from sdxl.conditioner import Conditioning, base_time_ids, refiner_time_ids

    shapes = unet_inputs(preset, kind, resolution, batch)  # meta tensors: only their shapes are used
    g = torch.Generator().manual_seed(0)
    size = (resolution, resolution)
    ids = (base_time_ids(size, (0, 0), size, batch) if kind == "base"
           else refiner_time_ids(size, (0, 0), 6.0, batch))
    cond = Conditioning(context=torch.randn(tuple(shapes["encoder_hidden_states"].shape), generator=g),
                        pooled=torch.randn(tuple(shapes["added_cond_kwargs"]["text_embeds"].shape), generator=g),
                        time_ids=ids)
    return torch.randn(tuple(shapes["sample"].shape), generator=g).to(device), cond.to(device)


def plan_for(s: Settings, batch: int, checkpointing: bool, gpu_gb: float) -> dict:
    from stages.train.plan import make_plan

    return make_plan(kind="base", preset=s.preset, resolution=s.resolution, world_size=1, micro_batch_size=batch,
                     global_batch_size=batch, strategy="fsdp", activation_checkpointing=checkpointing,
                     gpu_memory_gb=gpu_gb)


def train_trial(s: Settings, batch: int, checkpointing: bool) -> dict:
    """Optimizer steps of the base UNet at micro-batch ``batch`` through the project's FSDP2 strategy + EMA."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from omegaconf import OmegaConf

    from sdxl.diffusion import diffusion_loss
    from stages.train.ema import EMA
    from stages.train.strategies import make_strategy

    device = torch.device(s.device)
    train_cfg = OmegaConf.merge(OmegaConf.load(os.path.join(_REPO, "pipeline", "conf", "train", "default.yaml")),
                                {"strategy": "fsdp", "activation_checkpointing": checkpointing,
                                 "mixed_precision": "bf16", "micro_batch_size": batch, "global_batch_size": batch})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    strategy = make_strategy(train_cfg, device, batch, 1)
    model = build_random(s.preset, "base", device)
    # The units DiffusionTask.wrap_units hands the strategy: every transformer and resnet block.
    units = [m for m in model.modules() if isinstance(m, (Transformer2DModel, ResnetBlock2D))]
    if checkpointing:
        strategy.apply_activation_checkpointing(units)
    model, optimizer = strategy.wrap(model, units)
    model.train()
    ema = EMA(strategy.local_params(model), float(train_cfg.ema_decay))
    latents, cond = random_conditioning(s.preset, "base", batch, device, s.resolution)
    generator = torch.Generator(device=device).manual_seed(0)
    losses = []

    def step():
        with strategy.sync_context(model, last_micro_batch=True):
            with strategy.autocast():
                loss, _ = diffusion_loss(model, latents, cond, generator=generator)
            strategy.backward(model, loss)
        strategy.optimizer_step(model, optimizer)
        ema.update(strategy.local_params(model))
        losses.append(loss.detach())

    for _ in range(s.warmup_steps):
        step()
    _, seconds = _timed(device, lambda: [step() for _ in range(s.timed_steps)])
    step_s = seconds / s.timed_steps
    result = {"batch": batch, "activation_checkpointing": checkpointing, "step_s": round(step_s, 4),
              "samples_per_s": round(batch / step_s, 3), "loss": round(float(torch.stack(losses).float().mean()), 4)}
    if device.type == "cuda":
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return result


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def largest_batch(s: Settings, checkpointing: bool, gpu_gb: float, deadline: float) -> tuple[dict | None, list]:
    """Doubling / halving search over power-of-two micro-batches from the plan's guess; (largest run, all tries)."""
    guess = 1
    while guess * 2 <= s.max_batch and plan_for(s, guess * 2, checkpointing, gpu_gb)["fits"]:
        guess *= 2
    tried: list[dict] = []
    best, batch, direction = None, guess, 0
    while 1 <= batch <= s.max_batch and time.monotonic() < deadline:
        try:
            result = train_trial(s, batch, checkpointing)
        except RuntimeError as err:  # torch.OutOfMemoryError is one; cuBLAS/cuDNN report theirs as RuntimeError
            if not is_out_of_memory(err):
                raise
            result = {"batch": batch, "activation_checkpointing": checkpointing, "oom": True}
        _free(torch.device(s.device))
        tried.append(result)
        if result.get("oom"):
            if best is not None or direction > 0:
                break
            direction, batch = -1, batch // 2
            continue
        best = result
        if direction < 0:
            break
        direction, batch = 1, batch * 2
    return best, tried


def train_section(s: Settings, forward_flops: int, peak_tflops: float | None, gpu_gb: float, deadline: float) -> dict:
    out = {"forward_tflop_per_sample": float(f"{forward_flops / 1e12:.4g}"), "peak_bf16_tflops": peak_tflops,
           "runs": {}}
    for checkpointing in (False, True):
        best, tried = largest_batch(s, checkpointing, gpu_gb, deadline)
        name = "checkpointing_on" if checkpointing else "checkpointing_off"
        run: dict = {"tried": tried, "largest": best}
        if best is not None:
            achieved = best["samples_per_s"] * 3 * forward_flops / 1e12
            run["model_tflops_per_s"] = float(f"{achieved:.4g}")
            run["mfu"] = round(achieved / peak_tflops, 4) if peak_tflops else None
            plan = plan_for(s, best["batch"], checkpointing, gpu_gb)
            comparable = plan["total_gb_per_gpu"] - plan["memory_gb_per_gpu"]["frozen_models"] - \
                plan["memory_gb_per_gpu"]["overhead"]
            run["plan_total_gb"] = plan["total_gb_per_gpu"]
            run["plan_comparable_gb"] = round(comparable, 2)
            if "peak_allocated_gb" in best:
                run["memory_error"] = round(best["peak_allocated_gb"] / comparable - 1, 4)
        out["runs"][name] = run
    return out


def sampler_section(s: Settings) -> dict:
    from omegaconf import OmegaConf

    from sdxl.latent_scale import vae_downsample
    from sdxl.sampling import SampleParams, decode_latents, refine_sdedit, sample_base

    device = torch.device(s.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    strength = float(OmegaConf.load(os.path.join(_REPO, "pipeline", "conf", "serve", "default.yaml"))
                     .request_defaults.refiner_strength)
    base = build_random(s.preset, "base", device, dtype).eval()
    refiner = build_random(s.preset, "refiner", device, dtype).eval()
    vae = build_random(s.preset, "vae", device).eval()
    _, cond = random_conditioning(s.preset, "base", 1, device, s.resolution)
    _, rcond = random_conditioning(s.preset, "refiner", 1, device, s.resolution)
    uncond, runcond = (type(c)(torch.zeros_like(c.context), torch.zeros_like(c.pooled), c.time_ids)
                       for c in (cond, rcond))
    down = vae_downsample(vae)
    params = SampleParams(height=s.resolution, width=s.resolution, steps=s.sampler_steps, seed=0,
                          latent_downsample=down)
    with torch.no_grad():
        sample_base(base, cond, uncond, SampleParams(height=s.resolution, width=s.resolution, steps=2,
                                                     latent_downsample=down))  # warm-up
        latents, base_s = _timed(device, lambda: sample_base(base, cond, uncond, params))
        _, refine_s = _timed(device, lambda: refine_sdedit(refiner, latents, rcond, runcond, strength=strength,
                                                           steps=s.sampler_steps, seed=0,
                                                           latent_downsample=down))
        decode_latents(vae, latents)  # warm-up
        images, decode_s = _timed(device, lambda: decode_latents(vae, latents))
    if images.shape[-2:] != (s.resolution, s.resolution):
        raise RuntimeError(f"decoded images are {tuple(images.shape)}, expected {s.resolution}² pixels")
    del base, refiner, vae
    _free(device)
    return {"steps": s.sampler_steps, "base_s": round(base_s, 3), "refiner_strength": strength,
            "refiner_steps": int(s.sampler_steps * strength), "base_plus_refiner_s": round(base_s + refine_s, 3),
            "vae_decode_fp32_s": round(decode_s, 3), "unet_dtype": str(dtype).replace("torch.", "")}


def render_markdown(report: dict) -> str:
    from benchmarks.gpu_check_serve import report_markdown

    return report_markdown(report, GOAL_MFU, GOAL_MEMORY_ERROR)


def run_check(out_dir: str, budget_s: float, skip_serve: bool, peak_override: float | None) -> dict:
    from benchmarks.flops import unet_forward_flops

    started = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = Settings.for_device(device, budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # On a CPU the plan is still computed (against an 80 GB H100) so its code path runs; there is nothing to compare.
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 80.0
    peak = peak_override or (peak_bf16_tflops(name) if device.type == "cuda" else None)
    report = {"device": name, "settings": asdict(s), "torch": torch.__version__,
              "gpu_memory_gb": round(gpu_gb, 1) if device.type == "cuda" else None,
              "started_at": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    forward_flops = unet_forward_flops(s.preset, "base", s.resolution)
    with one_rank_process_group(device):
        # Training gets about half of the budget; sampling and Serve take the rest.
        report["train"] = train_section(s, forward_flops, peak, gpu_gb, started + 0.5 * budget_s)
    report["sampler"] = sampler_section(s)
    if skip_serve:
        report["serve"] = {"skipped": "--skip-serve"}
    else:
        from benchmarks.gpu_check_serve import serve_section

        report["serve"] = serve_section(s)
    report["wall_s"] = round(time.monotonic() - started, 1)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(render_markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget (the batch search stops)")
    parser.add_argument("--skip-serve", action="store_true", help="leave out the Serve latency (no Ray start)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak, if not in the table")
    args = parser.parse_args(argv)
    report = run_check(args.out, args.budget_s, args.skip_serve, args.peak_tflops)
    print(render_markdown(report))
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
