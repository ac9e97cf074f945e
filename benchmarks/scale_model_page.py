"""docs/scale_model.md from the figures benchmarks/bench_scale_model.py measured and the assumptions below.

Every number on the page is either a measured figure (§1) or computed here from those and the stated assumptions,
so changing an assumption or re-measuring rewrites the whole page consistently.
"""

from __future__ import annotations

# ---- assumptions (what cannot be measured on this machine) --------------------------------------------------------
PEAK_TFLOPS = 989.0  # H100 SXM bf16 dense
MFU = 0.40
GPUS = 256
GPUS_PER_NODE = 8
BATCH = 2048
PAIRS = 6e9
CPU_NODES, CORES_PER_NODE = 32, 64
ALLREDUCE_GB_S = 100.0  # effective bus bandwidth per GPU across 32 p5 nodes
DOWNLOAD_PER_MACHINE_S = 100e6 / (20 * 3600)  # img2dataset: "100M urls in 20h on one machine"
CAPTIONS_PER_GPU_S = 300.0
IMAGE_KB = 150
STEPS = {"pretrain256": 600_000, "pretrain512": 200_000, "finetune_aspect": 100_000}
RESOLUTION = {"pretrain256": 256, "pretrain512": 512, "finetune_aspect": 1024}
CHECKPOINT_EVERY, CHECKPOINTS_KEPT, NODE_WRITE_GB_S = 2000, 3, 1.0
LOADER_WORKERS = 8  # loader.num_workers of the full preset

COMMAND = "python benchmarks/bench_scale_model.py"


def _sci(value: float) -> str:
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}×10^{int(exponent)}"


def training_rows(f: dict) -> dict:
    """Per base stage: TF per sample (3 × UNet forward + VAE encoder + text encoders), totals and step times."""
    useful = GPUS * PEAK_TFLOPS * MFU
    sync_s = 2 * 2 * f["params"]["unet_base"] / 1e9 / ALLREDUCE_GB_S  # ring all-reduce of bf16 grads: 2 × size
    rows = {}
    for stage, steps in STEPS.items():
        r = RESOLUTION[stage]
        unet = 3 * f["flops_tf"][f"base_{r}"]
        sample = unet + f["flops_tf"][f"vae_encode_{r}"] + f["flops_tf"]["text_encoders"]
        compute_s = BATCH * sample / useful
        rows[stage] = {"resolution": r, "unet_tf": unet, "sample_tf": sample, "steps": steps,
                       "samples": steps * BATCH, "total": sample * 1e12 * steps * BATCH, "compute_s": compute_s,
                       "sync_s": sync_s, "frozen_share": 1 - unet / sample,
                       "hours_min": steps * max(compute_s, sync_s) / 3600,
                       "hours_max": steps * (compute_s + sync_s) / 3600,
                       "per_gpu_images_s": PEAK_TFLOPS * MFU / sample}
    return rows


def _section_measured(f: dict) -> list[str]:
    t, p = f["flops_tf"], f["params"]
    demo, photo, dec = f["data_cpu_ms_demo"], f["data_cpu_ms_photo"], f["decode_cpu_ms_photo"]

    def data_row(label: str, d: dict) -> str:
        return (f"| data pass, CPU ms per image: {label} ({d['images']}, mean {d['mean_kb']} KB) | read {d['read']} + "
                f"`process_sample` {d['process_sample']} (timed alone: its decode check [{d['decode_check']}] "
                f"{d['of_which_decode_check']}, sha256 {d['of_which_sha256']}) + tar members {d['tar_members']} → "
                f"**{d['total']} ms** | `stages.data.process.process_sample`, `stages.data.shards.sample_members` |")

    return [
        "## 1. What was measured here, and how",
        "",
        f"FLOPs: `torch.utils.flop_counter.FlopCounterMode` over the `full` preset built on the meta device "
        f"(`benchmarks/flops.py`), batch 1, 77-token context, a multiply-add counted as 2 FLOPs (the convention of GPU "
        f"peak figures). CPU: `time.process_time` of this process around each step of the per-sample work, so other "
        f"jobs on a shared machine do not inflate it; what Ray Data adds per image is `benchmarks/RESULTS.md` § data.",
        "",
        "| figure | value | how |",
        "|---|---|---|",
        f"| base UNet forward, 256² / 512² / 1024² (32² / 64² / 128² latents) | **{t['base_256']:.3f} / {t['base_512']:.3f}"
        f" / {t['base_1024']:.3f} TFLOP** per sample | {p['unet_base']:,} parameters, `time_ids` 6 |",
        f"| refiner UNet forward, 1024² | **{t['refiner_1024']:.3f} TFLOP** per sample | {p['unet_refiner']:,} "
        f"parameters, `time_ids` 5 |",
        f"| VAE encoder, 256² / 512² / 1024² | **{t['vae_encode_256']:.3f} / {t['vae_encode_512']:.3f} / "
        f"{t['vae_encode_1024']:.3f} TFLOP** per image | `vae.encode`, {p['vae']:,} parameters (encoder + decoder) |",
        f"| VAE decoder, 1024² | **{t['vae_decode_1024']:.3f} TFLOP** per image | `vae.decode` (serving, sample grids) |",
        f"| both text encoders, 77 tokens | **{t['text_encoders']:.3f} TFLOP** per caption | CLIP ViT-L "
        f"({p['text_encoder_l']:,}) + OpenCLIP bigG ({p['text_encoder_g']:,}) text towers |",
        f"| CLIP ViT-L/14 image embedding, 224² | **{t['scorer_image']:.3f} TFLOP** per image | the filter's "
        f"CLIP / aesthetic scorer (open_clip `ViT-L-14` image tower) |",
        data_row("demo images", demo),
        data_row("photo-like 1024×768 JPEGs, quality 90", photo),
        f"| the same JPEGs: decode check in full instead of [{photo['decode_check']}]; decode + shrink to 512 "
        f"(scorer / captioner input) | {photo['full_decode_check']} ms; **{dec['decode_shrink_512']} ms** | "
        f"`stages.data.images.check_image`, `decode_rgb` |",
        f"| training loader, CPU ms per sample (decode → Alg. 1 crop → tensor) at 256² / 512² / 1024² | "
        f"**{dec['loader_256']} / {dec['loader_512']} / {dec['loader_1024']}** | `stages.train.data_loader` "
        f"`decode_rgb`, `sdxl.crops.bucket_crop_resize`, `pil_to_tensor` on the photo-like JPEGs |",
        "",
    ]


def _section_assumptions(f: dict, rows: dict) -> list[str]:
    scorer_rate = PEAK_TFLOPS * MFU / f["flops_tf"]["scorer_image"]
    sync = rows["pretrain256"]["sync_s"]
    return [
        "## 2. Assumptions (not measurable here)",
        "",
        f"- **H100 SXM bf16 dense peak {PEAK_TFLOPS:g} TFLOP/s; model FLOPs utilisation (MFU) {MFU:.0%}** → "
        f"{PEAK_TFLOPS * MFU:.1f} TFLOP/s useful per GPU. A convolution-and-GroupNorm-heavy UNet at small per-GPU "
        f"batches rarely sustains 40%; §4 shows 20% and 10% as well. `python benchmarks/gpu_check.py` measures the "
        f"real MFU on one GPU.",
        "- One training sample costs **3 × forward** of the trained UNet (forward + backward ≈ 2 × forward), plus one "
        "forward of the frozen VAE encoder and text encoders unless latents and embeddings were cached "
        "(`stage=cache_latents`). Sampling grids and evaluation are ignored (< 1%).",
        f"- The paper does not give the step count of the ≈1024² multi-aspect fine-tune (nor finetune_quality / "
        f"refiner); we assume **{STEPS['finetune_aspect']:,} steps** for finetune_aspect and show per-10k-step "
        f"figures so any other count is one multiplication away.",
        f"- Gradient synchronisation: {f['params']['unet_base'] / 1e9:.3f}B bf16 gradients = "
        f"{2 * f['params']['unet_base'] / 1e9:.2f} GB per step; a ring all-reduce moves ≈ 2 × that per GPU. We assume "
        f"an effective bus bandwidth of **{ALLREDUCE_GB_S:g} GB/s** per GPU across 32 p5 nodes (8 × 400 Gb/s EFA, "
        f"NVLink inside the node) → **{sync:.3f} s per step**, overlappable with the backward pass at best "
        f"(FSDP/ZeRO-3 moves ≈ 1.5 × as much).",
        f"- Download: img2dataset's published figure, \"100M urls in 20h on one machine\" (≈ "
        f"{DOWNLOAD_PER_MACHINE_S:,.0f} samples/s per 16-core machine with a fast uplink); `ingest` runs it for URL "
        f"lists.",
        f"- GPU models in the data stages: the CLIP ViT-L/14 image embedding of §1 at {MFU:.0%} MFU → "
        f"{PEAK_TFLOPS * MFU:.1f} / {f['flops_tf']['scorer_image']:.3f} ≈ **{scorer_rate:,.0f} images/s per H100**; "
        f"captioning (BLIP/CoCa, ~20 generated tokens, memory-bound decoding) ≈ **{CAPTIONS_PER_GPU_S:g} images/s per "
        f"H100** (assumed).",
        "",
    ]


def _section_data(f: dict) -> list[str]:
    photo, dec = f["data_cpu_ms_photo"], f["decode_cpu_ms_photo"]
    cores = CPU_NODES * CORES_PER_NODE
    per_core = 1000 / photo["total"]
    core_hours = PAIRS / per_core / 3600
    scored_ms = photo["total"] + dec["decode_shrink_512"]
    scored_core_hours = PAIRS / (1000 / scored_ms) / 3600
    scorer_rate = PEAK_TFLOPS * MFU / f["flops_tf"]["scorer_image"]
    download_machine_s = PAIRS / DOWNLOAD_PER_MACHINE_S
    return [
        f"## 3. Data stages: {PAIRS / 1e9:g}B pairs",
        "",
        f"CPU work per photo-like image (no models): **{photo['total']} ms** (§1) → 1000 / {photo['total']} = "
        f"**{per_core:,.0f} images/s per core**.",
        "",
        f"- {_sci(PAIRS)} images / {per_core:,.0f} = **{core_hours:,.0f} core-hours**.",
        f"- On the launcher's CPU group at full size ({CPU_NODES} × {CORES_PER_NODE} = {cores:,} cores): "
        f"**{core_hours / cores:.1f} hours**.",
        f"- With scoring on, each image is also decoded and shrunk for the scorer: + {dec['decode_shrink_512']} ms → "
        f"{scored_ms:.2f} ms → {scored_core_hours:,.0f} core-hours → **{scored_core_hours / cores:.1f} hours** on "
        f"{cores:,} cores.",
        "",
        "GPU work (only when `scoring` / `caption.synthetic` are on):",
        "",
        f"- Scores: {_sci(PAIRS)} / {scorer_rate:,.0f} = **{PAIRS / scorer_rate / 3600:,.0f} GPU-hours** → "
        f"{PAIRS / scorer_rate / 3600 / GPUS:.1f} hours on {GPUS} H100s.",
        f"- Synthetic captions for all of them: {_sci(PAIRS)} / {CAPTIONS_PER_GPU_S:g} = "
        f"**{PAIRS / CAPTIONS_PER_GPU_S / 3600:,.0f} GPU-hours** → {PAIRS / CAPTIONS_PER_GPU_S / 86400 / GPUS:.1f} "
        f"days on {GPUS} H100s (caption only the subset that survives the filters to divide this).",
        "",
        f"Download is the real bound: {_sci(PAIRS)} / {DOWNLOAD_PER_MACHINE_S:,.0f} = "
        f"**{download_machine_s / 86400:.0f} machine-days** → **{download_machine_s / 86400 / CPU_NODES:.1f} days on "
        f"{CPU_NODES} machines**, ≈ {PAIRS * IMAGE_KB / 1e9:,.0f} TB at {IMAGE_KB} KB per image.",
        "",
    ]


def _section_training(f: dict, rows: dict) -> list[str]:
    useful = GPUS * PEAK_TFLOPS * MFU
    lines = [
        f"## 4. Training: {GPUS} H100s, batch {BATCH}",
        "",
        "| stage | UNet train (3 × forward) | + VAE encoder + text encoders | samples (steps × batch) | total FLOPs |",
        "|---|---|---|---|---|",
    ]
    for stage, r in rows.items():
        lines.append(f"| {stage} ({r['resolution']}²) | {r['unet_tf']:.3f} TF | **{r['sample_tf']:.3f} TF** | "
                     f"{r['steps']:,} × {BATCH} = {_sci(r['samples'])} | **{_sci(r['total'])}** |")
    t = f["flops_tf"]
    refiner_sample = 3 * t["refiner_1024"] + t["vae_encode_1024"] + t["text_encoders"]
    lines += [
        f"| train_refiner (1024²), per 10k steps | {3 * t['refiner_1024']:.3f} TF | **{refiner_sample:.3f} TF** | "
        f"10,000 × {BATCH} | **{_sci(refiner_sample * 1e12 * 1e4 * BATCH)}** |",
        "",
        f"Cluster rate at {MFU:.0%} MFU: {GPUS} × {PEAK_TFLOPS * MFU:.1f} TFLOP/s = {_sci(useful * 1e12)} FLOP/s.",
        "",
        "| stage | compute per step | gradient sync per step | step time (overlapped … serial) | wall-clock |",
        "|---|---|---|---|---|",
    ]
    for stage, r in rows.items():
        lines.append(f"| {stage} | {BATCH} × {r['sample_tf']:.3f} TF / {useful:,.0f} TF/s = **{r['compute_s']:.3f} s**"
                     f" | {r['sync_s']:.3f} s | {max(r['compute_s'], r['sync_s']):.3f} … "
                     f"{r['compute_s'] + r['sync_s']:.3f} s | **{r['hours_min']:.1f} … {r['hours_max']:.1f} h** |")
    total_min = sum(r["hours_min"] for r in rows.values()) / 24
    total_max = sum(r["hours_max"] for r in rows.values()) / 24
    bound = [s for s, r in rows.items() if r["sync_s"] > r["compute_s"]]
    lines += [
        "",
        f"So on {GPUS} H100s the base model's schedule is **≈ {total_min:.1f} – {total_max:.1f} days of pure training "
        f"at {MFU:.0%} MFU**." + (f" {', '.join(bound)} {'is' if len(bound) == 1 else 'are'} bound by the gradient "
                                   f"all-reduce, not by FLOPs: keep gradient communication in bf16 and bucketed / "
                                   f"overlapped (DDP's buckets, FSDP's reduce-scatter), or train that stage on fewer "
                                   f"GPUs, which barely changes its wall-clock." if bound else ""),
        "",
        "Sensitivity to MFU (compute-bound part only; add the all-reduce floor where it dominates):",
        "",
        "| MFU | " + " | ".join(rows) + " | base total |",
        "|---|" + "---|" * (len(rows) + 1),
    ]
    for mfu in (0.4, 0.2, 0.1):
        hours = [r["compute_s"] * MFU / mfu * r["steps"] / 3600 for r in rows.values()]
        lines.append(f"| {mfu:.0%} | " + " | ".join(f"{h:.1f} h" for h in hours) + f" | {sum(hours) / 24:.1f} days |")
    shares = ", ".join(f"{r['frozen_share']:.0%} at {r['resolution']}²" for r in rows.values())
    lines += [
        "",
        f"Caching latents and text embeddings (`stage=cache_latents`) removes the VAE and text-encoder share of a "
        f"sample: {shares}; a cached latent fixes the crop, so Alg. 1's random crop is drawn at caching time.",
        "",
    ]
    return lines + _memory_and_loader(f, rows)


def _memory_and_loader(f: dict, rows: dict) -> list[str]:
    m, dec = f["memory_plan"], f["decode_cpu_ms_photo"]
    threads = {s: r["per_gpu_images_s"] * dec[f"loader_{r['resolution']}"] / 1000 for s, r in rows.items()}
    return [
        f"Memory (one H100, 80 GB), from the `train.dry_run=true` plan (`stages/train/plan.py`) at 1024², "
        f"micro-batch 8: model states (weights, grads, AdamW, EMA) **{m['ddp_states_gb']} GB** per GPU under DDP "
        f"(plan total {m['ddp_total_gb']:.1f} GB with {m['activation_gb_per_sample']} GB of activations per sample: does not "
        f"fit); FSDP over a node's 8 GPUs: {m['fsdp8_states_gb']} GB of states, {m['fsdp8_total_gb']:.1f} GB in all, "
        f"{m['fsdp8_ac_total_gb']:.1f} GB with activation checkpointing ({m['activation_gb_per_sample_ac']} GB per sample). "
        f"So the 1024² stages want FSDP/ZeRO and checkpointing; `python benchmarks/gpu_check.py` compares the plan "
        f"with `torch.cuda.max_memory_allocated`.",
        "",
        "Data loading per GPU: at 40% MFU a GPU consumes " + ", ".join(
            f"{r['per_gpu_images_s']:.0f} samples/s at {r['resolution']}²" for r in rows.values())
        + "; at the loader's CPU cost per sample (§1) that is " + ", ".join(
            f"{threads[s]:.1f} cores" for s in rows) + f" of decoding per GPU (PIL releases the GIL while it decodes "
        f"and resizes, so decode threads can use several cores). The full preset runs "
        f"`loader.num_workers={LOADER_WORKERS}` decode threads per GPU; whether they keep the data-wait fraction under "
        f"5% (threads share one Python process) is **what a GPU run must confirm**: the figure measured here is the "
        f"real shard loader's data-wait fraction at the tiny preset on CPU (`benchmarks/RESULTS.md` § train, "
        f"`real_loader_data_wait_fraction`), which says nothing about {LOADER_WORKERS} workers feeding an H100.",
        "",
    ]


def _section_schedule(f: dict, rows: dict) -> list[str]:
    photo = f["data_cpu_ms_photo"]
    download_days = PAIRS / DOWNLOAD_PER_MACHINE_S / 86400 / CPU_NODES
    caption_days = PAIRS / CAPTIONS_PER_GPU_S / 86400 / GPUS
    low = sum(r["hours_min"] for r in rows.values()) / 24
    high = sum(r["hours_max"] for r in rows.values()) / 24
    low20 = sum(max(2 * r["compute_s"], r["sync_s"]) * r["steps"] for r in rows.values()) / 86400
    high20 = sum((2 * r["compute_s"] + r["sync_s"]) * r["steps"] for r in rows.values()) / 86400
    t = f["flops_tf"]
    refiner_step = BATCH * (3 * t["refiner_1024"] + t["vae_encode_1024"] + t["text_encoders"]) / (
        GPUS * PEAK_TFLOPS * MFU)
    ckpt_gb = f["params"]["unet_base"] * (4 + 8 + 4) / 1e9
    return [
        "## 5. The whole schedule",
        "",
        "| phase | resources | days |",
        "|---|---|---|",
        f"| download + data stages ({PAIRS / 1e9:g}B pairs; CPU {photo['total']} ms per image) | {CPU_NODES} × "
        f"{CORES_PER_NODE}-core CPU nodes (+ {GPUS} H100 if every image gets a synthetic caption) | "
        f"≈ {download_days:.1f} (+ {caption_days:.1f}) |",
        f"| pretrain256 + pretrain512 + finetune_aspect ({STEPS['finetune_aspect'] // 1000}k) | {GPUS} H100, "
        f"{MFU:.0%} MFU, {ALLREDUCE_GB_S:g} GB/s all-reduce | ≈ {low:.1f} – {high:.1f} |",
        f"| same at 20% MFU | {GPUS} H100 | ≈ {low20:.1f} – {high20:.1f} |",
        f"| refiner, per 10k steps | {GPUS} H100 | + {refiner_step * 1e4 / 86400:.2f} |",
        "",
        f"Checkpoints (`stages/train/checkpointing.py`): model + AdamW + EMA of the base UNet ≈ "
        f"{f['params']['unet_base'] / 1e9:.3f}B × (4 + 8 + 4) B ≈ {ckpt_gb:.0f} GB; every {CHECKPOINT_EVERY:,} steps "
        f"with {CHECKPOINTS_KEPT} kept that is ≈ {ckpt_gb * CHECKPOINTS_KEPT:.0f} GB on the object store, written in ≈ "
        f"{ckpt_gb / (GPUS / GPUS_PER_NODE * NODE_WRITE_GB_S):.1f} s when each of the {GPUS // GPUS_PER_NODE} nodes "
        f"writes its FSDP shard at ~{NODE_WRITE_GB_S:g} GB/s.",
        "",
    ]


def _section_plumbing() -> list[str]:
    return [
        "## 6. Serving and the cluster tests (the plumbing, not the scale)",
        "",
        "`tests/cluster/` runs the same CLI on a small shared machine, so its timings are fixed costs per command "
        "(Ray start-up, `ray job submit` uploading the working directory, a private head's start), paid once per "
        "stage on a cluster and negligible against hours of work.",
        "",
        "Serving at the tiny preset on CPU: `benchmarks/RESULTS.md` § load (a fixed-concurrency load test, "
        "`benchmarks/load_serve.py`) and § serve_fault (one of two BaseSampler replicas killed under that load; the "
        "requests that failed while Serve started its replacement), both written by "
        "`python benchmarks/run.py load serve_fault`. A replica's death costs only the requests routed to it in the "
        "gap, so production configs keep `serve.deployments.base.num_replicas` ≥ 2 (or autoscaling with "
        "`min_replicas` ≥ 2).",
        "",
    ]


def render(f: dict) -> str:
    rows = training_rows(f)
    header = [
        "# A scale model on paper: the paper's schedule on a real cluster",
        "",
        f"How big a cluster, and how many days, for SDXL's schedule — {PAIRS / 1e9:g}B image-text pairs through the "
        f"data stages, then pretrain256 ({STEPS['pretrain256'] // 1000}k steps), pretrain512 "
        f"({STEPS['pretrain512'] // 1000}k steps) and the ≈1024² fine-tunes at batch {BATCH} on {GPUS} H100s — built "
        f"from figures measured in this repository and assumptions stated where we could not measure.",
        "",
        f"**Generated by `{COMMAND}`** (also run by `python benchmarks/run.py scale_model`; {f['machine']}, "
        f"{f['seconds']} s). §1 is what it measured; every other number is computed by "
        f"`benchmarks/scale_model_page.py` from §1 and the assumptions in §2. Do not edit by hand: change the "
        f"assumptions there and re-run.",
        "",
    ]
    body = (_section_measured(f) + _section_assumptions(f, rows) + _section_data(f) + _section_training(f, rows)
            + _section_schedule(f, rows) + _section_plumbing())
    return "\n".join(header + body)
