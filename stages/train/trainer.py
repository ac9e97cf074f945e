"""``run_training(cfg, ctx)``: the one function every training stage's ``run(cfg, ctx)`` calls.

It builds a Ray Train V2 ``TorchTrainer`` around :func:`stages.train.loop.train_loop`. Measured with ray 2.60:
``resume_from_checkpoint=`` raises in V2 (we pass ``train.resume_from`` in the loop config instead) and
``MLflowLoggerCallback`` is refused in a TorchTrainer RunConfig (rank 0 logs through an MlflowClient); re-running
with the same ``RunConfig(name, storage_path)`` resumes from the latest checkpoint, and after a worker failure
``ray.train.get_checkpoint()`` hands the restarted workers the latest one.

Layout: ``<storage>/<stage>/checkpoint_<step>/`` (Ray Train's run folder, storage = ``<root>/runs`` unless
``train.storage_path``), ``<root>/runs/<stage>/final/{model,ema,info.json}`` and ``.../samples/step_NNNNNN.png``.
Before training, a run folder made from other inputs (a retrained parent, another VAE or dataset) is moved aside so
the stage starts over instead of resuming it (:mod:`stages.train.stage_inputs`).
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from pipeline import storage
from stages.train import plan as plan_mod
from stages.train.stage_inputs import prepare_run


def cluster_settings(cfg) -> dict:
    """``cluster.num_workers`` (1), ``cluster.use_gpu`` (false), ``cluster.cpus_per_worker`` (1),
    ``cluster.gpus_per_worker`` (1, when use_gpu)."""
    def get(key, default):
        value = OmegaConf.select(cfg, f"cluster.{key}")
        return default if value is None else value

    num_workers, use_gpu = int(get("num_workers", 1)), bool(get("use_gpu", False))
    cpus, gpus = float(get("cpus_per_worker", 1)), float(get("gpus_per_worker", 1))
    if num_workers < 1:
        raise ValueError(f"cluster.num_workers must be >= 1, got {num_workers}")
    if cpus <= 0 or (use_gpu and gpus <= 0):
        raise ValueError(f"cluster.cpus_per_worker ({cpus}) and cluster.gpus_per_worker ({gpus}) must be > 0")
    return {"num_workers": num_workers, "use_gpu": use_gpu, "cpus_per_worker": cpus, "gpus_per_worker": gpus}


def storage_path(cfg, ctx) -> str:
    """Ray Train's storage: an absolute local path or a URI (Ray refuses relative paths)."""
    path = OmegaConf.select(cfg, "train.storage_path") or storage.join(ctx.root, "runs")
    path = str(path)
    return path if storage.is_remote(path) or path.startswith("file://") else os.path.abspath(path)


def loop_config(cfg, ctx, inputs_hash: str | None = None) -> dict:
    """The plain-dict ``train_loop_config`` (Ray pickles it to the workers)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return {"cfg": container, "root": str(ctx.root), "stage": ctx.stage, "tracking_uri": ctx.tracking_uri,
            "run_id": ctx.run_id, "ray_run_dir": storage.join(storage_path(cfg, ctx), ctx.stage),
            "inputs_hash": inputs_hash}


def build_trainer(cfg, ctx, inputs_hash: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stages.train.loop import train_loop
    from stages.train.worker_logging import ray_train_log_level

    cluster = cluster_settings(cfg)
    keep = int(cfg.train.keep_checkpoints)
    if keep < 1:
        raise ValueError(f"train.keep_checkpoints must be >= 1 (>= 2 to survive a corrupted latest one), got {keep}")
    resources = {"CPU": cluster["cpus_per_worker"]}
    if cluster["use_gpu"]:
        resources["GPU"] = cluster["gpus_per_worker"]
    return TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config=loop_config(cfg, ctx, inputs_hash),
        scaling_config=ScalingConfig(num_workers=cluster["num_workers"], use_gpu=cluster["use_gpu"],
                                     resources_per_worker=resources),
        run_config=RunConfig(name=ctx.stage, storage_path=storage_path(cfg, ctx),
                             failure_config=FailureConfig(max_failures=int(cfg.train.max_failures)),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep),
                             logging_config=LoggingConfig(log_level=ray_train_log_level(cfg.train))),
    )


def run_training(cfg, ctx) -> dict:
    """Train (or, with ``train.dry_run=true``, only print the plan) and return a small JSON-able summary."""
    cluster = cluster_settings(cfg)
    if bool(cfg.train.get("dry_run", False)):
        the_plan = plan_mod.plan_from_cfg(cfg, world_size=cluster["num_workers"])
        print(plan_mod.format_plan(the_plan))
        ctx.log_dict(the_plan, "train_plan.json")
        return {"stage": ctx.stage, "dry_run": True, "plan": the_plan}

    ctx.log_dict(OmegaConf.to_container(cfg.train, resolve=True), "train_config.json")
    final_dir = storage.join(ctx.root, "runs", ctx.stage, "final")
    current = prepare_run(cfg, storage.join(storage_path(cfg, ctx), ctx.stage), final_dir)
    result = build_trainer(cfg, ctx, current).fit()
    if result.error is not None:
        raise result.error
    info_path = storage.join(final_dir, "info.json")
    info = storage.read_json(info_path) if storage.exists(info_path) else {}
    checkpoint = result.checkpoint
    return {
        "stage": ctx.stage,
        "step": info.get("step"),
        "final_dir": final_dir,
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "world_size": cluster["num_workers"],
    }
