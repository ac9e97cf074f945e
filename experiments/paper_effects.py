"""The SDXL report's effects reproduced at toy scale, with numbers, in one command.

    python experiments/paper_effects.py [--quick] [--out DIR]

Trains toy UNets in-process (experiments/toy_training.py) on demo images at 32 px, then runs four experiments:
1. crop conditioning (Sec. 2.2, Fig. 5): c_crop = (0, 0) vs larger offsets, object centroid offset / cut-off;
2. size conditioning (Sec. 2.2, Fig. 3): small vs large c_size, high-frequency energy;
3. a Table 2 analogue: size-conditioned vs unconditioned vs "≥ training size only", equal steps;
4. the refiner (Sec. 2.5): base vs base + SDEdit refiner on the same seeds.
Writes ``DIR/results.md`` (generated block; commentary outside the markers is kept), ``DIR/results.json`` and
sample grids under ``DIR/results/``. DIR defaults to docs/. ``--quick`` is a seconds-long smoke run (for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments import effects_report as report  # noqa: E402
from experiments.toy_training import (RESOLUTION, SampleSpec, ToyText, TrainSpec, make_toy_dataset,  # noqa: E402
                                      refine_toy, sample_base_toy, train_toy)
from pipeline import storage  # noqa: E402
from sdxl.crops import crop, cover_size, resize  # noqa: E402


@dataclass(frozen=True)
class EffectsConfig:
    n_train: int = 2000
    n_heldout: int = 256
    data_seed: int = 0  # training images (demo generator seed)
    heldout_seed: int = 1  # held-out prompts and real reference images
    model_seed: int = 0  # UNet init, batch order, crops, noise, CFG dropout
    base_steps: int = 1600
    table_steps: int = 800  # Table 2: all three models are compared after this many steps
    refiner_steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    n_eval: int = 64  # seeds per setting in experiments 1, 2, 4
    n_fid: int = 128  # samples per model in experiment 3
    sample_steps: int = 20
    guidance_scale: float = 3.0
    crop_magnitudes: tuple[int, ...] = (0, 8, 16, 32, 64)
    size_values: tuple[int, ...] = (12, 24, 48, 96)
    crop_original_size: tuple[int, int] = (40, 120)  # c_size in experiment 1 (short, long side)
    large_size: int = 96  # c_size used as "large" (experiments 3 and 4)
    refiner_strength: float = 0.2
    threads: int = 1


QUICK = EffectsConfig(n_train=48, n_heldout=16, base_steps=4, table_steps=2, refiner_steps=2, batch_size=4,
                      n_eval=4, n_fid=8, sample_steps=2, crop_magnitudes=(0, 32), size_values=(12, 96),
                      refiner_strength=0.5)


def _crop_coords(magnitude: int, seed_index: int) -> tuple[int, int]:
    """Alternate the cropped axis between seeds (Alg. 1 crops one axis only): even seeds left, odd seeds top."""
    return (0, magnitude) if seed_index % 2 == 0 else (magnitude, 0)


def _crop_size(cfg: EffectsConfig, seed_index: int) -> tuple[int, int]:
    """A 3:1 original (wide for left crops, tall for top crops): resized to 32×96, so every c_crop up to 64 is one
    that Alg. 1 can produce for it (a square c_size with c_crop > 0 never occurs in training)."""
    short, long = cfg.crop_original_size
    return (short, long) if seed_index % 2 == 0 else (long, short)


def _sample(model, text, heldout, cfg: EffectsConfig, n: int, size_of, crop_of):
    """Images for the first ``n`` held-out prompts, seed i for prompt i; ``size_of(i)`` / ``crop_of(i)`` give
    c_size / c_crop (an int ``size_of`` means that square c_size for every seed)."""
    spec = SampleSpec(steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    prompts, seeds = [h.caption for h in heldout[:n]], list(range(n))
    if isinstance(size_of, int):
        sizes = torch.tensor([(size_of, size_of)] * n, dtype=torch.float32)
    else:
        sizes = torch.tensor([size_of(i) for i in range(n)], dtype=torch.float32)
    crops = torch.tensor([crop_of(i) for i in range(n)], dtype=torch.float32)
    return sample_base_toy(model, text, prompts, seeds, sizes, crops, spec)


# ------------------------------------------------------------------------------------------------- experiments
def data_crop_statistics(images, cfg: EffectsConfig) -> list[dict]:
    """What the training data teaches: measures of real Alg. 1 crops at each c_crop magnitude (where possible)."""
    rows = []
    for magnitude in cfg.crop_magnitudes:
        measures = []
        for image in images:
            size = cover_size(image.size, (RESOLUTION, RESOLUTION))
            spare_h, spare_w = size[0] - RESOLUTION, size[1] - RESOLUTION
            if max(spare_h, spare_w) < magnitude:
                continue
            top, left = (magnitude, 0) if spare_h > 0 else (0, magnitude)
            window = crop(resize(image.pixels, size), top, left, RESOLUTION, RESOLUTION)
            measures.append(report.object_rows((window.clamp(-1, 1)[None] + 1) / 2, [image.params])[0])
        rows.append({"c_crop": magnitude, "n": len(measures), **report.summarize(measures)})
    return rows


def crop_experiment(model, text, heldout, train_images, cfg, out_dir) -> dict:
    rows, per_image, grid = [], {"c_crop": [], "offset": [], "cutoff": []}, []
    params = [h.params for h in heldout[:cfg.n_eval]]
    for magnitude in cfg.crop_magnitudes:
        images = _sample(model, text, heldout, cfg, cfg.n_eval, lambda i: _crop_size(cfg, i),
                         lambda i, m=magnitude: _crop_coords(m, i))
        measures = report.object_rows(images, params)
        rows.append({"c_crop": magnitude, **report.summarize(measures)})
        per_image["c_crop"] += [magnitude] * len(measures)
        per_image["offset"] += [m["centroid_offset"] for m in measures]
        per_image["cutoff"] += [m["cutoff_fraction"] for m in measures]
        grid.append(images)
    return {
        "rows": rows,
        "data_rows": data_crop_statistics(train_images[:500], cfg),
        "corr_offset": report.correlation(per_image["c_crop"], per_image["offset"]),
        "corr_cutoff": report.correlation(per_image["c_crop"], per_image["cutoff"]),
        "grid": report.save_grid(grid, storage.join(out_dir, "results", "crop_conditioning.png")),
    }


def size_experiment(model, text, heldout, train_images, cfg, out_dir) -> dict:
    rows, xs, hfs, laps, grid, samples = [], [], [], [], [], {}
    for size in cfg.size_values:
        images = _sample(model, text, heldout, cfg, cfg.n_eval, size, lambda i: (0, 0))
        energies, laplace = report.hf_energies(images), report.laplacians(images)
        rows.append({"c_size": size, "hf_energy": report.mean_of(energies), "laplacian_variance": report.mean_of(laplace),
                     "hf_energy_std": float(np.std(energies))})
        xs += [float(np.log2(size))] * len(energies)
        hfs += energies
        laps += laplace
        grid.append(images)
        samples[size] = images
    # Real reference: Alg. 1 centre crops of held-out real images, split by original size.
    real_rows = []
    for label, keep in (("real, original < 32 px (upscaled)", lambda s: s < RESOLUTION),
                        ("real, original >= 32 px", lambda s: s >= RESOLUTION)):
        subset = [h for h in heldout if keep(min(h.size))]
        if subset:
            real = _real_crops(subset)
            real_rows.append({"set": label, "n": len(subset), "hf_energy": report.mean_of(report.hf_energies(real)),
                              "laplacian_variance": report.mean_of(report.laplacians(real))})
    return {"rows": rows, "real_rows": real_rows, "corr_log2_size_hf": report.correlation(xs, hfs),
            "corr_log2_size_laplacian": report.correlation(xs, laps),
            "grid": report.save_grid(grid, storage.join(out_dir, "results", "size_conditioning.png")),
            "samples": samples}


def _real_crops(images) -> torch.Tensor:
    from sdxl.crops import random_crop_resize

    crops = [random_crop_resize(h.pixels, RESOLUTION, mode="center")[0].clamp(-1, 1) for h in images]
    return (torch.stack(crops) + 1) / 2


def table2_experiment(results: dict, text, heldout, cfg, out_dir) -> dict:
    """Three models after ``table_steps`` steps each; FID etc. against held-out real images with originals >= 32."""
    real_pool = [h for h in heldout if min(h.size) >= RESOLUTION]
    evaluator = report.FidEvaluator(_real_crops(real_pool), seed=cfg.model_seed)
    rows, grid = [], []
    for name, (model, seen, pool, size) in results.items():
        images = _sample(model, text, heldout, cfg, cfg.n_fid, size, lambda i: (0, 0))
        found = report.summarize(report.object_rows(images, [h.params for h in heldout[:cfg.n_fid]]))["object_found"]
        rows.append({"model": name, "train_pool": pool, "images_seen": seen, "sampled_c_size": size,
                     "object_found": found, **evaluator.evaluate(images)})
        grid.append(images)
    return {"rows": rows, "real_n": len(real_pool), "real_hf_energy": evaluator.real_hf,
            "feature_net": evaluator.label,
            "grid": report.save_grid(grid, storage.join(out_dir, "results", "table2_models.png"))}


def refiner_experiment(refiner, text, heldout, base_samples: dict, cfg, out_dir) -> dict:
    spec = SampleSpec(steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    prompts, seeds = [h.caption for h in heldout[:cfg.n_eval]], list(range(cfg.n_eval))
    real_hf = report.mean_of(report.hf_energies(_real_crops([h for h in heldout if min(h.size) >= RESOLUTION]
                                                          or heldout)))
    rows, grid = [], []
    for size in (cfg.large_size, min(cfg.size_values)):
        base = base_samples[size]
        refined, start_t = refine_toy(refiner, text, base, prompts, seeds, strength=cfg.refiner_strength, spec=spec)
        for label, images in ((f"base (c_size={size})", base), (f"base + refiner (c_size={size})", refined)):
            hf = report.mean_of(report.hf_energies(images))
            rows.append({"images": label, "hf_energy": hf, "hf_gap_to_real": abs(hf - real_hf),
                         "laplacian_variance": report.mean_of(report.laplacians(images)),
                         "mean_abs_change": float((refined - base).abs().mean()) if images is refined else 0.0})
            grid.append(images)
    return {"rows": rows, "start_timestep": start_t, "real_hf_energy": real_hf,
            "grid": report.save_grid(grid, storage.join(out_dir, "results", "refiner.png"))}


# ------------------------------------------------------------------------------------------------------ driver
def run(cfg: EffectsConfig, out_dir: str, command: str, log=print) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.model_seed)
    np.random.seed(cfg.model_seed)
    clock = {"start": time.perf_counter()}
    train_images = make_toy_dataset(cfg.n_train, cfg.data_seed)
    heldout = make_toy_dataset(cfg.n_heldout, cfg.heldout_seed)
    text = ToyText(seed=cfg.model_seed)
    text.encode([im.caption for im in train_images + heldout] + [""])
    common = {"batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.model_seed}
    specs = {
        "size+crop conditioned": TrainSpec("A size+crop cond.", steps=cfg.base_steps,
                                           snapshot_steps=(cfg.table_steps,), **common),
        "unconditioned (c_size fixed)": TrainSpec("B c_size fixed", steps=cfg.table_steps, size_conditioning=False,
                                                  **common),
        "only originals >= 32 px": TrainSpec("C >=32 px only", steps=cfg.table_steps, min_original_side=RESOLUTION,
                                             **common),
        "refiner": TrainSpec("R refiner", steps=cfg.refiner_steps, kind="refiner", t_range=(0, 200), **common),
    }
    trained = {}
    for key, spec in specs.items():
        trained[key] = train_toy(train_images, spec, text, log=log)
    clock["training"] = time.perf_counter() - clock["start"]
    base = trained["size+crop conditioned"]
    snap_model, snap_seen = base.snapshots[cfg.table_steps]
    table_models = {
        "size-conditioned (all data)": (snap_model, snap_seen, base.pool_size, cfg.large_size),
        "unconditioned (all data)": (trained["unconditioned (c_size fixed)"].model,
                                     trained["unconditioned (c_size fixed)"].seen_images,
                                     trained["unconditioned (c_size fixed)"].pool_size, RESOLUTION),
        "only originals >= 32 px": (trained["only originals >= 32 px"].model,
                                    trained["only originals >= 32 px"].seen_images,
                                    trained["only originals >= 32 px"].pool_size, cfg.large_size),
    }
    log("experiment 1: crop conditioning")
    crop_res = crop_experiment(base.model, text, heldout, train_images, cfg, out_dir)
    log("experiment 2: size conditioning")
    size_res = size_experiment(base.model, text, heldout, train_images, cfg, out_dir)
    log("experiment 3: Table 2 analogue")
    table_res = table2_experiment(table_models, text, heldout, cfg, out_dir)
    log("experiment 4: refiner")
    refiner_res = refiner_experiment(trained["refiner"].model, text, heldout, size_res.pop("samples"), cfg, out_dir)
    clock["total"] = time.perf_counter() - clock["start"]
    results = {
        "command": command, "config": dataclasses.asdict(cfg), "wall_seconds": clock,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
                   f"{cfg.threads} intra-op thread(s)",
        "training": {k: {"steps": r.spec.steps, "seconds": r.seconds, "pool": r.pool_size, "seen": r.seen_images,
                         "loss_curve": r.loss_curve} for k, r in trained.items()},
        "crop": crop_res, "size": size_res, "table2": table_res, "refiner": refiner_res,
    }
    storage.write_json_atomic(storage.join(out_dir, "results.json"), results)
    from experiments.effects_markdown import render_markdown

    report.write_results_page(storage.join(out_dir, "results.md"), render_markdown(results, out_dir))
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run with tiny settings")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "docs"), help="folder for results.md, results.json, results/")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else EffectsConfig()
    command = "python experiments/paper_effects.py" + (" --quick" if args.quick else "")
    results = run(cfg, args.out, command)
    print(f"done in {results['wall_seconds']['total']:.0f} s; wrote {storage.join(args.out, 'results.md')}")
    return results


if __name__ == "__main__":
    main()
