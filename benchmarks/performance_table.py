"""The README's performance table, written from benchmarks/results.json by ``python benchmarks/run.py``.

The table sits in README.md between the two marker comments below; every row names the ``run.py`` benchmark whose
figures it shows and when they were measured, so nothing in it is typed by hand. A benchmark that has not run yet
(or whose figures lack a key the row needs) gets a row saying so, never a stale number.
"""

from __future__ import annotations

import os
from typing import Callable

BEGIN = "<!-- performance table: written by `python benchmarks/run.py` (benchmarks/performance_table.py) -->"
END = "<!-- end of performance table -->"
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _data(r: dict) -> str:
    by_repeat = r.get("marginal_ratio_per_core_by_repeat")
    spread = f" (each repeat alone: {min(by_repeat):.2f}–{max(by_repeat):.2f})" if by_repeat else ""
    return (f"**{r['marginal_ratio_per_core']:.2f}×** the loop's images/s per core at the margin{spread}; fixed cost "
            f"{r['pipeline_intercept_s']:.0f} s; 1 → 2 workers {r['scaling_1_to_2_workers']:.2f}×")


def _sampler(r: dict) -> str:
    worst = max(r[f"{s}_max_abs_diff"] for s in ("euler", "ddim", "dpmpp_2m"))
    return (f"**{r['ratio']:.2f}** of diffusers' time (Euler {r['euler_ratio']:.2f}, DDIM {r['ddim_ratio']:.2f}, "
            f"DPM++ 2M {r['dpmpp_2m_ratio']:.2f}); largest latent difference {worst:.1e} (tests allow 1e-4)")


def _train(r: dict) -> str:
    return (f"**{r['ratio']:.2f}** of the bare loop's step time; real shard loader: data wait "
            f"**{_pct(r['real_loader_data_wait_fraction'])}** of step time (tiny preset, CPU)")


def _serve(r: dict) -> str:
    return (f"batching **{r['batching_speedup']:.2f}×** throughput (p50 {r['latency_batched_p50_s']:.2f} s vs "
            f"{r['latency_batch1_p50_s']:.2f} s); a request **{r['serve_overhead_ratio']:.2f}×** the in-process "
            f"time (+{1000 * r['serve_added_s_per_request']:.0f} ms)")


def _load(r: dict) -> str:
    return (f"{r['throughput_rps']:.1f} req/s, p50 {r['latency_p50_s']:.2f} s, p99 {r['latency_p99_s']:.2f} s, "
            f"{r['errors']} errors of {r['requests']}")


def _fault(r: dict) -> str:
    return (f"**{r['gap_failed_requests']} failed of {r['gap_requests']}** requests during the {r['gap_s']:.0f} s "
            f"Serve took to replace it; {r['after_recovery_ok']}/{r['after_recovery_sent']} ok after")


def _export(r: dict) -> str:
    return (f"largest pixel difference {r['base_pipeline_max_pixel_diff_levels']:g} (base) and "
            f"{r['refiner_img2img_max_pixel_diff_levels']:g} (refiner) levels of 255; single files: largest tensor "
            f"difference {max(r['single_file_base_max_abs_diff'], r['single_file_refiner_max_abs_diff']):g}")


# (run.py name, what is compared, the figure from its results, the goal)
ROWS: list[tuple[str, str, Callable[[dict], str], str]] = [
    ("data", "folder → bucketed shards vs a one-process loop doing the same per-image work", _data,
     "≥ 0.9×, ≤ 15 s"),
    ("data_urls", "URL list → shards vs img2dataset alone, same list and local server",
     lambda r: f"**{r['ratio']:.2f}×** img2dataset's images/s ({r['pipeline_samples_per_s']:.0f} vs "
               f"{r['img2dataset_samples_per_s']:.0f})", "≥ 0.8×"),
    ("data_plan", "driver memory planning and finalizing a huge dataset",
     lambda r: f"peak {max(r[f'{k}_driver_peak_rss_mb'] for k in ('urls', 'folder', 'finalize')):.0f} MB at "
               f"{r['rows']:,} rows", "< 1 GB"),
    ("sampler", "our sampler vs diffusers' `StableDiffusionXLPipeline`, same tiny components, 20 steps", _sampler,
     "≤ 1.05"),
    ("train", "Ray Train loop vs a bare PyTorch loop, same model and batches", _train, "≤ 1.10, < 5%"),
    ("cache", "cached latents vs online encoding, tiny pretrain256 step",
     lambda r: f"**{r['speedup']:.2f}×** faster cached", "report"),
    ("serve", "Serve: batching (8) vs batch size 1 at concurrency 8; one request vs the serving core in-process",
     _serve, "≥ 1.5×, ≤ 1.10"),
    ("load", "load test (`benchmarks/load_serve.py`), concurrency 2, 15 s, tiny app", _load, "report"),
    ("serve_fault", "one of two BaseSampler replicas killed under that load", _fault, "report"),
    ("export", "exported diffusers folders and single files vs our models", _export, "≤ 1 level; 0"),
    ("demo", "`make demo` on 2 cores: the exported base in diffusers on 63 held-out prompts (chance 0.14 / 0.17 / 0.11)",
     lambda r: f"object colour **{r['object_color_accuracy']:.2f}**, background **{r['background_accuracy']:.2f}**, "
               f"position **{r['position_accuracy']:.2f}**"
               + (f", shape {r['shape_accuracy']:.2f} (chance 0.17, no goal)" if "shape_accuracy" in r else "")
               + f"; VAE {r['vae_psnr_db']:.1f} dB; "
               f"{r['steps_total_s'] / 60:.0f} min of steps",
     "≥ 0.75 / 0.9 / 0.5; ≥ 25 dB; ≤ 15 min"),
    ("suite", "`make test` on 2 cores: wall time, and the machine's busy CPU over it divided by its cores (the wall "
     "time with every core busy all the time)",
     lambda r: f"**{r['wall_s'] / 60:.1f} min** ({r['passed']} passed); CPU floor {r['cpu_floor_s'] / 60:.1f} min "
               f"({100 * r['busy_share']:.0f}% busy)", "≤ 15 min"),
    ("scale_model", "FLOPs and CPU per image behind `docs/scale_model.md` (which it rewrites)",
     lambda r: f"base UNet forward at 1024²: {r['flops_tf.base_1024']:.3f} TFLOP; data pass "
               f"{r['data_cpu_ms_photo.total']:.2f} CPU ms per photo-like image", "report"),
]


def table(results: dict[str, dict]) -> str:
    lines = ["| benchmark (`python benchmarks/run.py NAME`) | figure | goal | measured |", "|---|---|---|---|"]
    for name, what, figure, goal in ROWS:
        r = results.get(name)
        if r is None:
            text, when = f"not measured yet: `python benchmarks/run.py {name}`", "—"
        elif "error" in r:
            text, when = f"failed: {r['error'][:120]}", r.get("measured_at", "—")
        else:
            try:
                text = figure(r)
            except (KeyError, TypeError, ValueError) as err:  # figures from an older version of the benchmark
                text = f"re-run `python benchmarks/run.py {name}` (its results lack {err})"
            when = r.get("measured_at", "—")
        lines.append(f"| `{name}`: {what} | {text} | {goal} | {when} |")
    return "\n".join(lines)


def update_readme(results: dict[str, dict], path: str = README) -> bool:
    """Replace the table between the markers; False (README untouched) when the markers are missing."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table(results)}\n{END}{tail}"
    if new != text:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(path + ".tmp", path)
    return True
