"""Does one base model of ``stage=paper_effects`` use c_crop? Its micro-conditioning use and experiment 1 (Fig. 5).

    python experiments/layout_probe.py --root DIR [--stage pretrain256] [--seeds 64]

Loads ``<root>/models/size_cond/runs/<stage>/final/ema`` (``pretrain256`` is the layout phase, ``pretrain512`` the
detail phase after it) with the chain's own autoencoder and text encoders, then prints
experiments/effects_models.py's micro_conditioning_use (x0 error with a mirrored c_crop / a swapped c_size) and, per
crop offset, where the sampled object sits along the cropped axis beside where the data puts it, with Spearman's ρ and
the fitted slope. Made for a chain run with a longer layout phase than the recorded one (docs/decisions.md,
2026-12-04) without training the other models; writes the grid (rows: offsets 0-16) to ``--grid``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from experiments import effects_report as report  # noqa: E402
from experiments.effects_models import (CONF, EffectModels, _training_images, chain_config,  # noqa: E402
                                        micro_conditioning_use, sample, step_configs)
from experiments.paper_effects import CROP_OFFSETS, RESOLUTION, crop_setting, expected_position  # noqa: E402
from pipeline import storage  # noqa: E402


def load_one(root: str, stage: str) -> EffectModels:
    from hydra import initialize_config_dir

    from sdxl.latent_scale import vae_scaling_factor
    from sdxl.models import build_unet
    from stages.train.task_components import build_frozen_parts
    from stages.train.tasks import load_module_weights

    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = step_configs(root, ("size_cond_layout",))["size_cond_layout"]
        demo_dir = str(chain_config(root).demo.out_dir)
    unet = build_unet(str(cfg.model.preset), "base", seed=0)
    load_module_weights(unet, storage.join(str(cfg.paths.root), "runs", stage, "final", "ema"))
    frozen = build_frozen_parts(cfg, "base", torch.device("cpu"))
    frozen.conditioner.force_zeros_for_empty_prompt = True  # what the base trained with (SPEC)
    real, sizes, captions = _training_images(demo_dir, limit=600)
    return EffectModels(bases={"probed": unet.eval().requires_grad_(False)}, refiner=None, vae=frozen.vae,
                        vae_scale=vae_scaling_factor(frozen.vae), conditioner=frozen.conditioner,
                        refiner_conditioner=None, resolution=RESOLUTION, sample_steps=20, guidance_scale=2.0,
                        real_images=real, real_sizes=sizes, real_captions=captions)


def main(argv: list[str] | None = None) -> dict:
    from stages.evaluate.prompt_following import heldout_specs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--stage", default="pretrain256")
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--grid", default="layout_probe_crop.png")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    models = load_one(os.path.abspath(args.root), args.stage)
    use = micro_conditioning_use(models, "probed")
    print("micro-conditioning use:", json.dumps(report.jsonable(use)))
    prompts = [spec.prompt for spec in report.centred(heldout_specs(args.seeds, seed=1))]
    seeds = list(range(args.seeds))
    rows, grids = [], []
    for offset in CROP_OFFSETS:
        settings = [crop_setting(offset, i) for i in seeds]
        images = sample(models, "probed", prompts, seeds, [s[0] for s in settings], [s[1] for s in settings])
        grids.append(images)
        found = [report.position_measures(image, axis) for image, (_, _, axis) in zip(images, settings)]
        rows += [{"offset": offset, **m} for m in found if m["found"]]
        at = [m["position"] for m in found if m["found"]]
        print(f"offset {offset:2d}: data {expected_position(offset):.3f}  model {sum(at) / max(1, len(at)):.3f}  "
              f"(object found in {len(at)}/{len(seeds)})", flush=True)
    x, y = [r["offset"] for r in rows], [r["position"] for r in rows]
    result = {"use": use, "spearman": report.spearman(x, y), "slope": report.slope(x, y),
              "expected_slope": (expected_position(max(CROP_OFFSETS)) - expected_position(0)) / max(CROP_OFFSETS),
              "grid": report.save_grid(grids, os.path.abspath(args.grid))}
    print(json.dumps(report.jsonable({k: v for k, v in result.items() if k != "use"})))
    return result


if __name__ == "__main__":
    main()
