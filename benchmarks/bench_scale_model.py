"""The figures behind docs/scale_model.md, measured here, and the page itself, rendered from them.

1. FLOPs per forward pass of every SDXL component at the ``full`` preset (benchmarks/flops.py: FlopCounterMode on
   meta-device models), and parameter counts.
2. CPU milliseconds per image of the data pass's per-sample work: reading the files, ``stages.data.process.
   process_sample`` (caption, one open of the bytes with the decode check, aspect, sha256, nearest bucket) and the
   sample's tar members (``stages.data.shards.sample_members``), measured with ``time.process_time`` (this process's
   CPU time, so other jobs on a shared machine do not inflate it) over two generated image sets: the demo data
   (``stages.data.demo_data``) and photo-like 1024×768 JPEGs (blurred noise, quality 90, ~150 KB: the size of a web
   image). What Ray Data adds per image on top is benchmarks/bench_data.py's figure (RESULTS.md § data).
3. CPU milliseconds per sample of the training loader's decode path (``stages.train.data_loader.decode_rgb`` →
   ``sdxl.crops.bucket_crop_resize`` → ``pil_to_tensor``) on the photo-like JPEGs at 256², 512² and 1024².

``main()`` returns the figures (``python benchmarks/run.py scale_model`` records them in RESULTS.md) and rewrites
docs/scale_model.md from them (benchmarks/scale_model_page.py), so the page's numbers always come from one run.

    python benchmarks/bench_scale_model.py [--out docs/scale_model.md] [--demo-images 200] [--photo-images 24]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

DEFAULT_OUT = os.path.join(_REPO, "docs", "scale_model.md")
PHOTO_SIZE = (768, 1024)  # (h, w)
PHOTO_QUALITY = 90
LOADER_RESOLUTIONS = (256, 512, 1024)
SCORER_SIDE = 512  # filter.score_max_side: what the scorer / captioner actors decode images to


def _cpu_ms(fn, count: int):
    """(fn's result, CPU milliseconds of this process per item over ``count`` items)."""
    start = time.process_time()
    result = fn()
    return result, (time.process_time() - start) * 1000.0 / max(1, count)


def _compose(preset: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(_REPO, "pipeline", "conf"), version_base=None):
        return compose(config_name="config", overrides=[f"preset={preset}", "stage=data"])


def write_photo_like(folder: str, n: int, seed: int = 0) -> list[bytes]:
    """``n`` blurred-noise JPEGs of PHOTO_SIZE (web-image sized) with .txt captions; returns their bytes."""
    import numpy as np
    from PIL import Image, ImageFilter

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        noise = rng.integers(0, 256, size=(*PHOTO_SIZE, 3), dtype=np.uint8)
        image = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(radius=2))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=PHOTO_QUALITY)
        Path(folder, f"photo{i:04d}.jpg").write_bytes(buf.getvalue())
        Path(folder, f"photo{i:04d}.txt").write_text(f"a photograph number {i}")
        out.append(buf.getvalue())
    return out


def _raw_samples(folder: str) -> list[dict]:
    """What the folder reader yields per image: key (path without extension), bytes, caption bytes, source."""
    out = []
    for image in sorted(Path(folder).rglob("*.*")):
        if image.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        caption = image.with_suffix(".txt")
        out.append({"key": str(image.relative_to(folder).with_suffix("")), "image": image.read_bytes(),
                    "caption_raw": caption.read_bytes() if caption.exists() else None, "source": str(image),
                    "meta": {}})
    return out


def data_stage_cpu_ms(folder: str, cfg) -> dict:
    """CPU ms per image of the data pass's per-sample work over every image of ``folder``, in one process: reading the
    files, ``process_sample`` (caption, one open with the decode check, aspect, sha256, bucket) with its two largest
    parts timed alone, and the sample's tar members. Scores and synthetic captions are off (model time)."""
    from sdxl.buckets import bucket_table
    from stages.data import images, process, shards

    opts = process.SampleOptions.from_config(cfg)
    table = bucket_table(opts.resolution, opts.multiple)
    n = len(_raw_samples(folder))
    ms = {}
    raws, ms["read"] = _cpu_ms(lambda: _raw_samples(folder), n)
    rows, ms["process_sample"] = _cpu_ms(lambda: [process.process_sample(r, 0, opts, table) for r in raws], n)
    kept = [r for r in rows if r.get("reject_reason") is None]
    if len(kept) != n:
        raise RuntimeError(f"process_sample kept {len(kept)} of {n} generated images; expected all")
    _, ms["tar_members"] = _cpu_ms(lambda: [shards.sample_members(r, shards.member_stem(r["key"])) for r in kept], n)
    data = [r["image"] for r in raws]
    _, check = _cpu_ms(lambda: [images.check_image(b, opts.max_pixels, opts.decode_check) for b in data], n)
    _, sha = _cpu_ms(lambda: [process.sha256_hex(b) for b in data], n)
    _, full_check = _cpu_ms(lambda: [images.check_image(b, opts.max_pixels, "full") for b in data], n)
    mean_kb = sum(len(b) for b in data) / n / 1024
    return {"images": n, "mean_kb": round(mean_kb, 1), **{k: round(v, 3) for k, v in ms.items()},
            "total": round(sum(ms.values()), 3), "decode_check": opts.decode_check,
            "of_which_decode_check": round(check, 3), "of_which_sha256": round(sha, 3),
            "full_decode_check": round(full_check, 3)}


def decode_ms(images: list[bytes]) -> dict:
    """CPU ms per image: decode + shrink to the scorer's side; the loader's decode → crop → tensor per resolution."""
    import numpy as np

    from sdxl.crops import bucket_crop_resize
    from stages.data.images import decode_rgb as data_decode  # the scorer / captioner input path
    from stages.train.data_loader import decode_rgb, pil_to_tensor

    n = len(images)
    out = {}
    _, out[f"decode_shrink_{SCORER_SIDE}"] = _cpu_ms(lambda: [data_decode(b, SCORER_SIDE) for b in images], n)
    rng = np.random.default_rng(0)
    for res in LOADER_RESOLUTIONS:
        _, out[f"loader_{res}"] = _cpu_ms(
            lambda: [pil_to_tensor(bucket_crop_resize(decode_rgb(b), (res, res), rng=rng)[0]) for b in images], n)
    return {k: round(v, 3) for k, v in out.items()}


def flop_figures(preset: str = "full") -> dict:
    from benchmarks import flops

    tf = 1e12
    out = {f"base_{r}": flops.unet_forward_flops(preset, "base", r) / tf for r in (256, 512, 1024)}
    out["refiner_1024"] = flops.unet_forward_flops(preset, "refiner", 1024) / tf
    out.update({f"vae_encode_{r}": flops.vae_flops(preset, r, "encode") / tf for r in (256, 512, 1024)})
    out["vae_decode_1024"] = flops.vae_flops(preset, 1024, "decode") / tf
    out["text_encoders"] = flops.text_encoders_flops(preset) / tf
    out["scorer_image"] = flops.scorer_image_flops() / tf
    return {k: round(v, 4) for k, v in out.items()}


def plan_figures(params: dict) -> dict:
    """The `train.dry_run` memory plan (stages/train/plan.py) of the base UNet at 1024², micro-batch 8."""
    from stages.train.plan import make_plan, model_counts

    counts = model_counts("full", "base")
    common = dict(kind="base", preset="full", resolution=1024, micro_batch_size=8, global_batch_size=2048,
                  param_counts=counts)
    ddp = make_plan(world_size=1, strategy="ddp", **common)
    fsdp = make_plan(world_size=8, strategy="fsdp", **common)
    fsdp_ac = make_plan(world_size=8, strategy="fsdp", activation_checkpointing=True, **common)
    states = ("weights", "grads", "optimizer", "ema")
    return {
        "ddp_states_gb": round(sum(ddp["memory_gb_per_gpu"][k] for k in states), 1),
        "ddp_total_gb": ddp["total_gb_per_gpu"],
        "fsdp8_states_gb": round(sum(fsdp["memory_gb_per_gpu"][k] for k in states), 1),
        "fsdp8_total_gb": fsdp["total_gb_per_gpu"],
        "fsdp8_ac_total_gb": fsdp_ac["total_gb_per_gpu"],
        "activation_gb_per_sample": round(fsdp["activation_gb_per_sample"], 2),
        "activation_gb_per_sample_ac": round(fsdp_ac["activation_gb_per_sample"], 2),
    }


def measure(demo_images: int = 200, photo_images: int = 24) -> dict:
    from benchmarks import flops
    from stages.data.demo_data import generate_demo_dataset

    started = time.perf_counter()
    cfg = _compose("full")
    params = flops.parameter_counts("full")
    figures = {"params": params, "flops_tf": flop_figures("full")}
    with tempfile.TemporaryDirectory(prefix="scale-model-") as tmp:
        demo = _compose("tiny").demo
        generate_demo_dataset(os.path.join(tmp, "demo"), n=demo_images, seed=0, max_side=int(demo.max_side),
                              min_side=int(demo.min_side), small_share=float(demo.small_share),
                              jpeg_share=float(demo.jpeg_share), folder_size=demo_images)
        figures["data_cpu_ms_demo"] = data_stage_cpu_ms(os.path.join(tmp, "demo"), cfg)
        photos = write_photo_like(os.path.join(tmp, "photo"), photo_images)
        figures["data_cpu_ms_photo"] = data_stage_cpu_ms(os.path.join(tmp, "photo"), cfg)
        figures["decode_cpu_ms_photo"] = decode_ms(photos)
    figures["memory_plan"] = plan_figures(params)
    figures["machine"] = (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the page (default: docs/scale_model.md)")
    parser.add_argument("--demo-images", type=int, default=200)
    parser.add_argument("--photo-images", type=int, default=24)
    args = parser.parse_args(argv if argv is not None else [])  # run.py calls main() with its own sys.argv
    from benchmarks.scale_model_page import render

    figures = measure(args.demo_images, args.photo_images)
    text = render(figures)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    flat = {"page": os.path.relpath(args.out, _REPO)}
    for section, values in figures.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat


if __name__ == "__main__":
    main(sys.argv[1:])
