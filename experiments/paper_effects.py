"""The SDXL report's conditioning effects, measured on models that the shipped stages train, in one command.

    python experiments/paper_effects.py [--root DIR] [--out DIR] [--seeds N] [--layout-steps N] [--skip-training]

1. Trains the models of ``stage=paper_effects`` (pipeline/conf/stage/paper_effects.yaml) through the real stages
   on an embedded Ray: central-subject demo data at toy sizes → `stage=data` shards → the autoencoder → a 32-px
   latent cache (one Alg. 1 crop per image) → three base models (size-conditioned, not size-conditioned, trained
   without the small originals) and a refiner. A re-run skips the steps that are complete.
2. Samples them with the project's sampler (sdxl.sampling) at chosen micro-conditioning; every setting uses the same
   prompts and the same initial noise per sample, so settings differ only in what is varied.
3. Measures four effects and writes ``DIR/results.md`` (the generated block; hand-written text outside the markers
   is kept), ``DIR/results.json`` and grids under ``DIR/results/``:
   crop conditioning (Fig. 5), size conditioning (Fig. 3), a Table 2 analogue, and the refiner (Sec. 2.5).
DIR defaults to docs/; the root (models, data, MLflow) to outputs/paper_effects.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from experiments import effects_markdown, effects_report as report  # noqa: E402
from experiments.effects_models import (EffectModels, load_models, micro_conditioning_use, sample,  # noqa: E402
                                        train_models)
from pipeline import storage  # noqa: E402
from stages.evaluate.prompt_following import heldout_specs  # noqa: E402

RESOLUTION = 32  # the models' training size
CROP_ORIGINAL = (64, 96)  # experiment 1: a 3:2 original, resized to 32×48; Alg. 1 offsets 0-16 px on the long side
CROP_OFFSETS = (0, 4, 8, 12, 16)
SIZES = (12, 20, 32, 64, 128)  # experiment 2: square c_size, crop (0, 0)
LARGE = (128, 128)  # "a large original": c_size of experiments 3 and 4 (the largest the data has)
# SDEdit from t ≈ 150 (4 of 20 Euler steps): inside the refiner's 200 trained levels (0.25 would start at t = 201).
REFINER_STRENGTH = 0.2


def crop_setting(offset: int, index: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(c_size, c_crop, axis) of sample ``index``: even samples a wide original cropped from the left (x = offset),
    odd ones a tall original cropped from the top; axis 0 = x, 1 = y. Alg. 1 crops one axis only."""
    h, w = CROP_ORIGINAL
    return ((h, w), (0, offset), 0) if index % 2 == 0 else ((w, h), (offset, 0), 1)


def expected_position(offset: int) -> float:
    """Where a centred object of the original lands along the cropped axis (fraction of the crop): the original's
    long side resized to 48 px, its centre at 24 px, minus the offset, over the 32-px crop."""
    scaled_long = RESOLUTION * max(CROP_ORIGINAL) / min(CROP_ORIGINAL)
    return (scaled_long / 2 - offset) / RESOLUTION


def experiment_crop(models: EffectModels, prompts: list[str], seeds: list[int], base: str = "size_cond") -> dict:
    rows, grids = [], []
    for offset in CROP_OFFSETS:
        settings = [crop_setting(offset, i) for i in range(len(seeds))]
        images = sample(models, base, prompts, seeds, [s[0] for s in settings], [s[1] for s in settings])
        grids.append(images)
        for image, (_, _, axis) in zip(images, settings):
            rows.append({"offset": offset, "expected": expected_position(offset),
                         **report.position_measures(image, axis)})
    square = sample(models, base, prompts, seeds, [(64, 64)] * len(seeds), [(0, 0)] * len(seeds))
    grids.insert(0, square)
    square_rows = [report.position_measures(image, 0) for image in square]
    summary = report.crop_statistics(rows, square_rows, CROP_OFFSETS)
    summary["real"] = report.real_crop_positions(models.real_images, models.real_sizes, CROP_OFFSETS, RESOLUTION)
    return {"rows": rows, "square_rows": square_rows, "grids": grids, "summary": summary}


def experiment_size(models: EffectModels, prompts: list[str], seeds: list[int], real: dict) -> dict:
    result = {"grids": {}}
    for name in ("size_cond", "no_size_cond"):
        sharpness = {}
        result["grids"][name] = []
        for side in SIZES:
            images = sample(models, name, prompts, seeds, [(side, side)] * len(seeds), [(0, 0)] * len(seeds))
            result["grids"][name].append(images)
            sharpness[side] = report.sharpness(images)
        result[name] = report.size_statistics(sharpness, SIZES)
    result["real"] = real
    return result


def experiment_table2(models: EffectModels, specs: list, seeds: list[int], real_large: float) -> dict:
    prompts = [spec.prompt for spec in specs]
    per_model, grids = {}, []
    for name in ("size_cond", "no_size_cond", "large_only"):
        # A size-conditioned model is asked for a large original; the unconditioned one gets the only c_size it saw.
        c_size = LARGE if name != "no_size_cond" else (RESOLUTION, RESOLUTION)
        images = sample(models, name, prompts, seeds, [c_size] * len(seeds), [(0, 0)] * len(seeds))
        grids.append(images)
        per_model[name] = {"c_size": list(c_size), **report.following_and_sharpness(images, specs)}
    return {"models": per_model, "grids": grids, "summary": report.table2_statistics(per_model, real_large)}


def experiment_refiner(models: EffectModels, specs: list, seeds: list[int], real_large: float) -> dict:
    prompts = [spec.prompt for spec in specs]
    base = sample(models, "size_cond", prompts, seeds, [LARGE] * len(seeds), [(0, 0)] * len(seeds))
    refined = sample(models, "size_cond", prompts, seeds, [LARGE] * len(seeds), [(0, 0)] * len(seeds),
                     refiner_strength=REFINER_STRENGTH)
    return {"grids": [base, refined], "strength": REFINER_STRENGTH,
            "summary": report.refiner_statistics(base, refined, specs, real_large)}


def run(args) -> dict:
    started = time.time()
    root = os.path.abspath(args.root)
    chain = [] if args.layout_steps is None else [f"workflow.layout_steps={args.layout_steps}"]
    if not args.skip_training:
        train_models(root, chain)
    trained = time.time() - started
    torch.manual_seed(0)
    models = load_models(root, resolution=RESOLUTION, sample_steps=args.sample_steps,
                         guidance_scale=args.guidance)
    seeds = list(range(args.seeds))
    specs = heldout_specs(len(seeds), seed=1)
    central = [spec.prompt for spec in report.centred(specs)]
    out_dir = os.path.abspath(args.out)
    results = {
        "command": args.command,
        "root": root, "seeds": len(seeds), "sample_steps": args.sample_steps, "guidance_scale": args.guidance,
        "sampler": models.sampler, "training": models.training_summary,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    use = {name: micro_conditioning_use(models, name) for name in ("size_cond", "no_size_cond")}
    crop = experiment_crop(models, central, seeds)
    # The training data's own sharpness at 32 px, once: experiment 2 reports it, 3 and 4 measure gaps to it.
    real = report.real_sharpness(models.real_images, models.real_sizes, RESOLUTION)
    real_large = real["large"]["laplacian_variance"]["mean"]
    size = experiment_size(models, central, seeds, real)
    table2 = experiment_table2(models, specs, seeds, real_large)
    refiner = experiment_refiner(models, specs, seeds, real_large)
    grid_dir = os.path.join(out_dir, "results")
    results["use"] = use
    results["crop"] = {"summary": crop["summary"], "original_size": list(CROP_ORIGINAL),
                       "grid": report.save_grid(crop["grids"], os.path.join(grid_dir, "crop_conditioning.png"))}
    results["size"] = {k: v for k, v in size.items() if k != "grids"}
    results["size"]["grids"] = {name: report.save_grid(rows, os.path.join(grid_dir, f"size_conditioning_{name}.png"))
                                for name, rows in size["grids"].items()}
    # Per model: its c_size and scores (the per-image answers behind the summary's tests stay out of the JSON).
    models_out = {name: {"c_size": m["c_size"], "scores": m["scores"]} for name, m in table2["models"].items()}
    results["table2"] = {"summary": table2["summary"], "models": models_out,
                         "grid": report.save_grid(table2["grids"], os.path.join(grid_dir, "table2_models.png"))}
    results["refiner"] = {"summary": refiner["summary"], "strength": refiner["strength"],
                          "grid": report.save_grid(refiner["grids"], os.path.join(grid_dir, "refiner.png"))}
    results["seconds"] = {"training": round(trained, 1), "total": round(time.time() - started, 1)}
    storage.write_json_atomic(os.path.join(out_dir, "results.json"), report.jsonable(results))
    report.write_results_page(os.path.join(out_dir, "results.md"),
                              effects_markdown.render_markdown(results, out_dir))
    return results


def command_line(args, parser: argparse.ArgumentParser) -> str:
    """The command that reproduces these results: the script with every option that changes them (not where the
    root and the page are)."""
    parts = ["python experiments/paper_effects.py"]
    for dest in ("layout_steps", "seeds", "sample_steps", "guidance"):
        if getattr(args, dest) != parser.get_default(dest):
            parts.append(f"--{dest.replace('_', '-')} {getattr(args, dest)}")
    return " ".join(parts + (["--skip-training"] if args.skip_training else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.join(REPO, "outputs", "paper_effects"))
    parser.add_argument("--out", default=os.path.join(REPO, "docs"))
    parser.add_argument("--seeds", type=int, default=128, help="samples per setting")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--layout-steps", type=int, default=None,
                        help="steps of each base's layout phase (default: the chain's workflow.layout_steps, 600)")
    parser.add_argument("--skip-training", action="store_true", help="measure the models already under --root")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 4:
        parser.error("--seeds must be >= 4")
    args.command = command_line(args, parser)
    os.chdir(REPO)
    results = run(args)
    print(effects_markdown.summary_lines(results))
    return results


if __name__ == "__main__":
    main()
