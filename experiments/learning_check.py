"""How much does a short chain through the real stages learn? (the ≤ 3-minute learning check of issue 10 §5)

Runs demo_data → data → [train_vae] → cache_latents (32 px) → pretrain256 → export → the prompt-following evaluation
(conditioning use included) of the exported base in diffusers, with the demo's recipe and shorter runs, under a fresh
root, and prints each step's seconds and the scores. docs/decisions.md (2026-12-01, "Conditioning use") has what it
gave.

    python experiments/learning_check.py ROOT [--images 200] [--vae-steps 0] [--vae DIR] [--base-steps 150]
                                              [--batch 32] [--resolution 32]

``--vae DIR`` uses an autoencoder trained before (e.g. ``outputs/runs/train_vae/final/model`` from ``make demo``)
instead of a train_vae step; otherwise train_vae runs ``--vae-steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def chain_config(args):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    chain = ["demo_data", "data"] + ([] if args.vae else ["train_vae"]) + ["cache_32", "pretrain256", "export",
                                                                            "evaluate"]
    overrides = [f"paths.root={os.path.abspath(args.root)}", "stage=demo", f"demo.num_images={args.images}",
                 "mlflow.enabled=false"]
    res = args.resolution
    with initialize_config_dir(config_dir=os.path.join(REPO, "pipeline", "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, f"workflow.chain=[{','.join(chain)}]"])
    with open_dict(cfg):
        steps = cfg.workflow.overrides
        steps["train_vae"] += [f"train.max_steps={args.vae_steps}"]
        steps["cache_32"] += ["cache.num_actors=1", f"loader.resolution={res}"]
        steps["pretrain256"] += [f"train.max_steps={args.base_steps}", f"train.global_batch_size={args.batch}",
                                 f"train.micro_batch_size={args.batch}", "train.sample_every=100000",
                                 "train.eval_every=100000", f"loader.resolution={res}"]
        steps["evaluate"] += [f"evaluate.resolution={res}", "evaluate.kind=prompt_following",
                              "evaluate.prompt_following.num_prompts=9", "evaluate.prompt_following.steps=4"]
        if args.vae:
            vae = os.path.abspath(args.vae)
            steps["cache_32"] += [f"++train.vae_from={vae}"]
            steps["pretrain256"] += [f"++train.vae_from={vae}"]
            steps["export"] = [*steps.get("export", []), f"export.vae={vae}"]
    return cfg, [o for o in overrides if o != "stage=demo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--vae", default=None)
    parser.add_argument("--vae-steps", type=int, default=2)
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    os.chdir(REPO)
    import ray

    from pipeline.dispatch import execute

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from hydra import initialize_config_dir

    cfg, overrides = chain_config(args)
    started = time.time()
    # The workflow composes each step's config, so it needs Hydra initialised as the CLI has it.
    with initialize_config_dir(config_dir=os.path.join(REPO, "pipeline", "conf"), version_base=None):
        result = execute("demo", cfg, overrides=overrides)
    score = result["stages"]["evaluate"]["prompt_following"]
    use = score["conditioning_use"]
    print(f"wall {time.time() - started:.0f} s; step seconds "
          f"{json.dumps({k: v.get('seconds') for k, v in result['stages'].items()})}")
    print("accuracy (9 prompts): " + ", ".join(f"{k} {score[f'{k}_accuracy']:.2f}"
                                                for k in ("background", "object_color", "position")))
    print(f"conditioning use ({use['num_images']} held-out images): " + ", ".join(
        f"{k} {100 * use[k]['gain']:+.1f}% (z {use[k]['z']:.1f})" for k in ("background", "object_color", "position")))


if __name__ == "__main__":
    main()
