"""Does one base model of ``stage=paper_effects`` use c_crop? Its micro-conditioning use and experiment 1 (Fig. 5).

    python experiments/layout_probe.py --root DIR [--stage pretrain256] [--seeds 64]

Loads ``<root>/models/size_cond/runs/<stage>/final/ema`` (``pretrain256`` is the layout phase, ``pretrain512`` the
detail phase after it) with the chain's own autoencoder and text encoders, then prints
experiments/effects_models.py's micro_conditioning_use (x0 error with a mirrored c_crop / a swapped c_size) and, per
crop offset, where the sampled object sits along the cropped axis beside where the data puts it, with Spearman's ρ and
the fitted slope: experiments/paper_effects.py's experiment 1 on this one model. Made for a chain run with a longer
layout phase than the recorded one (docs/decisions.md, 2026-12-04) without training the other models; writes the grid
(rows: c_crop (0, 0) with a square c_size, then offsets 0-16) to ``--grid``.
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
from experiments.effects_models import load_models, micro_conditioning_use  # noqa: E402
from experiments.paper_effects import RESOLUTION, experiment_crop  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    from stages.evaluate.prompt_following import heldout_specs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--stage", default="pretrain256")
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--grid", default="layout_probe_crop.png")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    # The layout step's weights under the name experiment 1 samples (size_cond_layout shares size_cond's root).
    models = load_models(os.path.abspath(args.root), resolution=RESOLUTION, sample_steps=20, guidance_scale=2.0,
                         bases={"size_cond": ("size_cond_layout", args.stage)}, with_refiner=False)
    use = micro_conditioning_use(models, "size_cond")
    print("micro-conditioning use:", json.dumps(report.jsonable(use)))
    prompts = [spec.prompt for spec in report.centred(heldout_specs(args.seeds, seed=1))]
    crop = experiment_crop(models, prompts, list(range(args.seeds)), base="size_cond")
    summary = crop["summary"]
    for row in summary["per_offset"]:
        at = row["position"]["mean"]
        print(f"offset {row['offset']:2d}: data {row['expected']:.3f}  model "
              f"{'-' if at is None else f'{at:.3f}'}  (object found in {row['found']['mean']:.0%})", flush=True)
    result = {"use": use, **{k: summary[k] for k in ("spearman", "slope", "expected_slope", "square")},
              "grid": report.save_grid(crop["grids"], os.path.abspath(args.grid))}
    print(json.dumps(report.jsonable({k: v for k, v in result.items() if k != "use"})))
    return result


if __name__ == "__main__":
    main()
