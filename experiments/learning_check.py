"""Variations of the learning check (`stage=learning_check`, pipeline/conf/stage/learning_check.yaml): how much does a
short chain through the real stages learn with other lengths, batches, timesteps or learning rates?

Runs the check's chain (demo_data → data → [train_vae] → cache_32 → pretrain256 → export → the
prompt-following evaluation of the exported base in diffusers) under a fresh root with the given changes, and prints each step's
seconds, the scores and whether the check's goals were met. docs/decisions.md ("A learning check in the suite") has
what it gave.

    python experiments/learning_check.py ROOT [--images N] [--vae DIR] [--vae-steps N] [--base-steps N] [--batch N]
                                              [--lr X] [--t-range LO,HI] [--prompts N] [--sample-steps N]
                                              [--set STEP:KEY=VALUE ...]

Unset options keep the stage's values. ``--vae DIR`` uses an autoencoder trained before (e.g.
``outputs/runs/train_vae/final/model`` from ``make demo``) instead of the train_vae step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def step_overrides(args) -> dict[str, list[str]]:
    """Per-step overrides for the options that were given."""
    steps: dict[str, list[str]] = {"demo_data": [], "train_vae": [], "cache_32": [], "pretrain256": [], "export": [],
                                   "evaluate": []}
    if args.images is not None:
        steps["demo_data"].append(f"demo.num_images={args.images}")
    if args.vae_steps is not None:
        steps["train_vae"] += [f"train.max_steps={args.vae_steps}", f"train.checkpoint_every={args.vae_steps}"]
    if args.base_steps is not None:
        steps["pretrain256"] += [f"train.max_steps={args.base_steps}", f"train.checkpoint_every={args.base_steps}"]
    if args.batch is not None:
        steps["pretrain256"] += [f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}"]
    if args.lr is not None:
        steps["pretrain256"].append(f"train.lr={args.lr}")
    if args.t_range is not None:
        steps["pretrain256"].append(f"train.t_range=[{args.t_range}]")
    if args.prompts is not None:
        steps["evaluate"].append(f"evaluate.prompt_following.num_prompts={args.prompts}")
    if args.sample_steps is not None:
        steps["evaluate"].append(f"evaluate.prompt_following.steps={args.sample_steps}")
    for item in args.set or []:
        step, _, override = item.partition(":")
        if step not in steps or not override:
            raise SystemExit(f"--set wants STEP:key=value with STEP one of {sorted(steps)}, got {item!r}")
        steps[step].append(override)
    if args.vae:
        vae = os.path.abspath(args.vae)
        steps["cache_32"].append(f"++train.vae_from={vae}")
        steps["pretrain256"].append(f"++train.vae_from={vae}")
        steps["export"].append(f"export.vae={vae}")
    return steps


def chain_config(args):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    overrides = [f"paths.root={os.path.abspath(args.root)}", "mlflow.enabled=false"]
    with initialize_config_dir(config_dir=os.path.join(REPO, "pipeline", "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, "stage=learning_check"])
    with open_dict(cfg):
        if args.vae:
            cfg.workflow.chain = [step for step in cfg.workflow.chain if step != "train_vae"]
        for step, extra in step_overrides(args).items():
            cfg.workflow.overrides[step] = [*(cfg.workflow.overrides.get(step) or []), *extra]
    return cfg, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    for name, kind in (("--images", int), ("--vae-steps", int), ("--base-steps", int), ("--batch", int),
                       ("--lr", float), ("--prompts", int), ("--sample-steps", int)):
        parser.add_argument(name, type=kind, default=None)
    parser.add_argument("--t-range", default=None, help="the base's training timesteps, as LO,HI")
    parser.add_argument("--vae", default=None, help="a trained autoencoder folder instead of the train_vae step")
    parser.add_argument("--set", action="append", metavar="STEP:KEY=VALUE", help="any other override for one step")
    args = parser.parse_args()
    os.chdir(REPO)
    import ray
    from hydra import initialize_config_dir

    from pipeline import storage
    from pipeline.dispatch import execute
    from pipeline.workflow import LearningCheckFailed

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg, overrides = chain_config(args)
    started = time.time()
    verdict = "met every goal"
    # The workflow composes each step's config, so it needs Hydra initialised as the CLI has it.
    with initialize_config_dir(config_dir=os.path.join(REPO, "pipeline", "conf"), version_base=None):
        try:
            execute("learning_check", cfg, overrides=overrides)
        except LearningCheckFailed as exc:
            verdict = f"FAILED: {exc}"
    root = os.path.abspath(args.root)
    markers = {step: storage.read_json(storage.join(root, "workflow", "learning_check", f"{step}.json"))
               for step in cfg.workflow.chain}
    score = markers["evaluate"]["result"]["prompt_following"]
    use = score["conditioning_use"]
    seconds = {step: round(m["result"].get("seconds") or 0, 1) for step, m in markers.items()}
    print(f"wall {time.time() - started:.0f} s; step seconds {seconds}")
    print(f"accuracy ({score['num_images']} prompts): " + ", ".join(
        f"{k} {score[f'{k}_accuracy']:.2f}" for k in ("background", "object_color", "position"))
        + f"; background lightness AUC {score['background_lightness_auc']:.2f}")
    print(f"conditioning use ({use['num_images']} held-out images): " + ", ".join(
        f"{k} {100 * use[k]['gain']:+.1f}% (z {use[k]['z']:.1f})" for k in ("background", "object_color", "position")))
    print(f"goals {dict(cfg.learning_check.goals)}: {verdict}")


if __name__ == "__main__":
    main()
