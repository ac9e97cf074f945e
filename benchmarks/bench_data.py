"""Data stages (ingest → filter → caption → buckets, ``stages.data.pipeline.run``) against a bare PIL loop.

Both sides take the same ~300 generated demo images. The bare loop only does the unavoidable work of each sample —
read the file, decode it, read its size, resize it to its aspect bucket and re-encode it — in one process on one core.
The pipeline runs on an embedded Ray with one actor per stage (``concurrency=1``) and then two; its samples/s per
CPU core divides by the actors per stage. Scores and synthetic captions are off (model time is not data-path time).
``ratio`` = pipeline samples/s per core at one worker / bare loop samples/s, end to end (Ray Data's per-stage
start-up of a few seconds included). ``marginal_ratio`` takes that fixed cost out: the pipeline also runs on a small
subset, and (N − n) / (t_N − t_n) is the rate at which extra samples go through — what a long run on a cluster sees.
Goal: ratio ≥ 0.7. ``scaling`` = throughput with 2 workers / with 1 (ideal 2.0; bounded by the cores the machine really
has free).

Run: ``python benchmarks/bench_data.py`` (prints the numbers; ``main()`` returns them).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

NUM_IMAGES = 1600
SMALL_IMAGES = 80  # the subset that measures the pipeline's fixed start-up cost
MAX_SIDE = 512
GOAL_RATIO = 0.7
CONF = Path(_REPO) / "pipeline" / "conf"
SECTIONS = ("ingest", "filter", "caption", "buckets")


def _image_files(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.suffix in (".png", ".jpg"))


def bare_loop(files: list[str], resolution: int, multiple: int) -> float:
    """Seconds for read → decode → size → resize to the nearest bucket → re-encode, over every file."""
    from PIL import Image

    from sdxl.buckets import bucket_table, nearest_bucket

    table = bucket_table(resolution, multiple)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        image = Image.open(io.BytesIO(data))
        fmt = image.format
        image = image.convert("RGB")
        h, w = nearest_bucket(image.height, image.width, table)
        out = io.BytesIO()
        image.resize((w, h), Image.Resampling.BICUBIC).save(out, format=fmt)
    return time.perf_counter() - start


def _data_config(source: str, workers: int, resolution: int, multiple: int):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({name: OmegaConf.load(CONF / name / "default.yaml") for name in SECTIONS})
    cfg.scoring = {"enabled": False}
    cfg.ingest.source = source
    cfg.ingest.chunk_size = max(1, NUM_IMAGES // (4 * workers))  # a few chunks per worker
    cfg.caption.synthetic = False
    cfg.buckets.resolution = resolution
    cfg.buckets.multiple = multiple
    for name in SECTIONS:
        cfg[name].concurrency = workers
    return cfg


def pipeline_run(source: str, root: str, workers: int, resolution: int, multiple: int,
                 chunk_size: int | None = None) -> tuple[float, dict]:
    from pipeline.context import StageContext
    from stages.data.pipeline import run

    ctx = StageContext(root=root, stage="data", dataset=f"bench_w{workers}")
    cfg = _data_config(source, workers, resolution, multiple)
    if chunk_size is not None:
        cfg.ingest.chunk_size = chunk_size
    start = time.perf_counter()
    summary = run(cfg, ctx)
    return time.perf_counter() - start, summary


def _marginal(n: int, n_s: float, small_s: float, bare_rate: float) -> dict:
    """Rate of the extra N − n samples, once the fixed start-up is paid; None when timing noise hides it."""
    extra_s = n_s - small_s
    if extra_s < 0.2 * n_s:
        return {"marginal_samples_per_s_per_core": None, "marginal_ratio": None,
                "marginal_note": f"N={n} ran {n_s:.1f}s vs {small_s:.1f}s for n={SMALL_IMAGES}: start-up dominates"}
    rate = (n - SMALL_IMAGES) / extra_s
    return {"pipeline_fixed_startup_s": round(small_s - SMALL_IMAGES / rate, 1),
            "marginal_samples_per_s_per_core": round(rate, 1), "marginal_ratio": round(rate / bare_rate, 3)}


def main() -> dict:
    import ray

    from stages.data.demo_data import generate_demo_dataset

    resolution, multiple = 512, 64
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        source = os.path.join(tmp, "demo")
        generated = generate_demo_dataset(source, n=NUM_IMAGES, seed=0, max_side=MAX_SIDE)
        files = _image_files(source)
        small_source = os.path.join(tmp, "small")
        generate_demo_dataset(small_source, n=SMALL_IMAGES, seed=1, max_side=MAX_SIDE)
        bare_s = min(bare_loop(files, resolution, multiple) for _ in range(2))
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address="local", num_cpus=min(2, os.cpu_count() or 1) or 1, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        try:
            chunk = max(1, NUM_IMAGES // 4)
            small_s, _ = pipeline_run(small_source, os.path.join(tmp, "root0"), 1, resolution, multiple,
                                      chunk_size=chunk)
            one_s, summary = pipeline_run(source, os.path.join(tmp, "root1"), 1, resolution, multiple)
            two_s, _ = pipeline_run(source, os.path.join(tmp, "root2"), 2, resolution, multiple)
        finally:
            if started_ray:
                ray.shutdown()
    bare_rate = len(files) / bare_s
    one_rate, two_rate = len(files) / one_s, len(files) / two_s
    results = {
        "images": len(files),
        "demo_generation_images_per_s": round(NUM_IMAGES / generated["seconds"], 1),
        "bare_loop_samples_per_s_per_core": round(bare_rate, 1),
        "pipeline_1_worker_samples_per_s_per_core": round(one_rate, 1),
        "pipeline_2_workers_samples_per_s_per_core": round(two_rate / 2, 1),
        "ratio": round(one_rate / bare_rate, 3),
        **_marginal(len(files), one_s, small_s, bare_rate),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": one_rate / bare_rate >= GOAL_RATIO,
        "scaling_1_to_2_workers": round(two_rate / one_rate, 3),
        "kept": summary.get("kept"),
        "rejected": summary.get("rejected"),
    }
    return results


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
