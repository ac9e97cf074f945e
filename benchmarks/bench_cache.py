"""Cached latents vs online encoding: optimizer-step time of the pretrain256 task on the same shards.

Online, every step runs the frozen VAE encoder and both text encoders before the UNet; with `stage=cache_latents`
those outputs are read from latent shards (`loader.cached=true`). Both sides use the tiny preset, one CPU thread,
the same micro-batch, and the real loader (decode thread pool included); the first steps are warm-up.
``speedup`` = online step time / cached step time. On a GPU cluster at 1024² the VAE encoder costs ~4.9 TFLOP per
image against ~20 TFLOP for a UNet training step (docs/scale_model.md), so expect a larger gain there than this
tiny-preset figure, whose VAE is small next to its UNet.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

STEPS, WARMUP, MICRO = 12, 3, 4
BUCKETS = {(64, 64): 48}


def _step_time(cfg) -> float:
    import torch

    from stages.train.data_loader import make_batch_iterator
    from stages.train.tasks import make_task

    task = make_task(cfg)
    model = task.build_model()
    model.train()
    task.setup(torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = make_batch_iterator(cfg, 0, 1, MICRO, 0, 1)
    times = []
    for step in range(STEPS):
        start = time.perf_counter()
        batch = next(batches)
        loss, _ = task.loss(model, batch, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    if hasattr(batches, "close"):
        batches.close()
    return sorted(times[WARMUP:])[len(times[WARMUP:]) // 2]


def main() -> dict:
    import torch
    from omegaconf import OmegaConf

    from stages.train.cache_latents import CacheActor, _check_or_write_info, cache_identity, plan_cache
    from stages.train.data_manifest import latent_cache_dir
    from tests.train.shard_fixtures import stage_cfg, write_dataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_cache_") as root:
            write_dataset(os.path.join(root, "data", "default"), BUCKETS)
            common = ["train.init_from=null", f"train.micro_batch_size={MICRO}"]
            cache_cfg = stage_cfg("cache_latents", root, overrides=["loader.resolution=64"])
            # What the stage's Ray Data actors do, in this process (Ray start-up is not what is measured here).
            _check_or_write_info(latent_cache_dir(cache_cfg), cache_identity(cache_cfg))
            actor = CacheActor(OmegaConf.to_container(cache_cfg, resolve=True), "cpu")
            started = time.perf_counter()
            cached_samples = sum(actor.process(item) for item in plan_cache(cache_cfg))
            cache_s = time.perf_counter() - started
            online = _step_time(stage_cfg("pretrain256", root, overrides=common))
            cached = _step_time(stage_cfg("pretrain256", root, overrides=[*common, "loader.cached=true"]))
    finally:
        torch.set_num_threads(threads)
    return {
        "setup": f"tiny preset pretrain256 task, 64x64 px, micro-batch {MICRO}, median of {STEPS - WARMUP} steps, CPU",
        "online_step_s": round(online, 4),
        "cached_step_s": round(cached, 4),
        "speedup": round(online / cached, 3),
        "cache_build_s": round(cache_s, 2),
        "cached_samples": cached_samples,
    }


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
