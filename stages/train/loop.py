"""``train_loop(config)``: what every Ray Train worker runs for a training stage.

Per optimizer step: ``accumulation`` micro-batches (so the global batch is the same on any cluster size), each
forward+backward under the strategy's sync and autocast contexts, one clipped optimizer step, an lr-schedule step
and an EMA update. Randomness is re-derived at every step from ``(train.seed, step, rank)`` — the loss generator and
torch/numpy/python's global RNGs — so N steps + resume to 2N reproduce a straight 2N-step run exactly.
Rank 0 logs metrics and sample grids to MLflow; every rank reports each checkpoint to Ray Train.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from pipeline import storage
from stages.train import checkpointing, final_export
from stages.train.ema import EMA
from stages.train.sample_grid import grid_png_bytes, sample_artifact_name
from stages.train.schedules import make_lr_scheduler
from stages.train.strategies import make_strategy
from stages.train.worker_logging import Progress, WorkerLogger, quiet_ray_train_reports, ray_train_log_level

log = logging.getLogger(__name__)


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that ``micro × world × accumulation == global``."""
    per_pass = micro_batch_size * world_size
    if micro_batch_size < 1 or global_batch_size < 1:
        raise ValueError(f"train.global_batch_size ({global_batch_size}) and train.micro_batch_size "
                         f"({micro_batch_size}) must be >= 1")
    if global_batch_size % per_pass:
        raise ValueError(f"train.global_batch_size={global_batch_size} is not divisible by train.micro_batch_size "
                         f"× cluster.num_workers = {micro_batch_size} × {world_size} = {per_pass}; pick sizes "
                         f"whose product divides it")
    return global_batch_size // per_pass


def derive_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, step, rank, stream)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), int(stream)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_step(generator: torch.Generator, seed: int, step: int, rank: int) -> None:
    """Re-seed the loss generator and the global RNGs (dropout, task-side randomness) for ``step``."""
    generator.manual_seed(derive_seed(seed, step, rank, 0))
    torch.manual_seed(derive_seed(seed, step, rank, 1))
    np.random.seed(derive_seed(seed, step, rank, 2) % 2**32)
    random.seed(derive_seed(seed, step, rank, 3))


def load_factory(path: str):
    """``"package.module:function"`` → the function (how the task and batch iterator are chosen)."""
    module_name, _, attr = str(path).partition(":")
    if not module_name or not attr:
        raise ValueError(f"factory path must look like 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module_name), attr)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _mean_across_ranks(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


class _Window:
    """Sums over the steps since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.steps, self.step_time, self.data_wait, self.loss, self.grad_norm = 0, 0.0, 0.0, 0.0, 0.0
        self.extra: dict[str, float] = {}

    def add(self, step_time, data_wait, loss, grad_norm, extra):
        """``loss`` and ``grad_norm`` may be device tensors; they are read back only when a line is logged."""
        self.steps += 1
        self.step_time += step_time
        self.data_wait += data_wait
        self.loss += loss
        self.grad_norm += grad_norm
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)


def train_loop(config: dict) -> None:
    """Ray Train entry: ``config`` = {cfg (resolved plain dict), root, stage, tracking_uri, run_id}."""
    import ray.train
    import ray.train.torch

    tctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # As many intra-op threads as CPUs Ray reserved for this worker: Ray's own OMP_NUM_THREADS is skipped when
        # the driver's environment already sets one (a test session's 1 ran the learning check single-threaded).
        torch.set_num_threads(max(1, int(float(config["cfg"].get("cluster", {}).get("cpus_per_worker", 1)))))
    quiet_ray_train_reports(ray_train_log_level(config["cfg"].get("train", {})))
    run_worker(config, tctx.get_world_rank(), tctx.get_world_size(), device, ray.train.get_checkpoint())


def run_worker(config: dict, rank: int, world_size: int, device: torch.device, latest_checkpoint) -> None:
    import ray.train

    cfg = OmegaConf.create(config["cfg"])
    tc = cfg.train
    micro = int(tc.micro_batch_size)
    accum = accumulation_steps(int(tc.global_batch_size), micro, world_size)
    max_steps = int(tc.max_steps)
    seed = int(tc.seed)
    logger = WorkerLogger(config.get("tracking_uri"), config.get("run_id"), enabled=rank == 0)

    task = load_factory(tc.task_factory)(cfg)
    model = task.build_model()
    task.setup(device)
    signature = checkpointing.model_signature(model)
    strategy = make_strategy(tc, device, micro, accum)
    units = list(task.wrap_units(model))
    if bool(tc.activation_checkpointing):
        strategy.apply_activation_checkpointing(units)
    model, optimizer = strategy.wrap(model, units)
    model.train()
    scheduler = make_lr_scheduler(optimizer, tc)
    ema = EMA(strategy.local_params(model), float(tc.ema_decay), bool(tc.ema_warmup))
    generator = torch.Generator(device=device)

    latest = latest_checkpoint.path if latest_checkpoint is not None else None
    if latest is not None and getattr(latest_checkpoint, "filesystem", None) is not None:
        latest = _as_uri(latest_checkpoint)
    resume_from = tc.resume_from
    if latest is None and not resume_from and config.get("ray_run_dir"):
        # A driver killed right after a checkpoint was written, before Ray recorded it, leaves Ray with nothing to
        # hand back; the checkpoint folders on storage are the truth (each is verified before use).
        if checkpointing.list_checkpoints(config["ray_run_dir"]):
            resume_from = config["ray_run_dir"]
    paths = checkpointing.candidates(latest, resume_from)
    cfg_hash = checkpointing.config_hash(config["cfg"])
    start_step, resumed_path = checkpointing.resume(
        paths, signature=signature, strategy=strategy, model=model, optimizer=optimizer, scheduler=scheduler,
        ema=ema, generator=generator, world_size=world_size, stage=config["stage"], cfg_hash=cfg_hash)
    if rank == 0:
        log.warning("training %s: steps %d→%d, %d worker(s) × micro-batch %d × %d accumulation = %d per step%s",
                    config["stage"], start_step, max_steps, world_size, micro, accum, micro * world_size * accum,
                    f", resumed from {resumed_path}" if resumed_path else "")
        logger.set_tags({"train.accumulation": accum, "train.world_size": world_size,
                         "train.torch_threads": torch.get_num_threads(), **task.lineage_tags()})

    meta = {"model_name": task.model_name, "signature": signature, "world_size": world_size,
            "zero_stage": int(tc.zero_stage), "config_hash": cfg_hash,
            "recipe_hash": checkpointing.recipe_hash(config["cfg"]),
            "stage": config["stage"], "inputs_hash": config.get("inputs_hash")}
    run_dir = storage.join(config["root"], "runs", config["stage"])
    batches = None
    if start_step < max_steps:
        batches = load_factory(tc.batches_factory)(cfg, rank, world_size, micro, start_step, accum)
    window = _Window()
    progress = Progress(config["stage"], max_steps, float(tc.get("progress_every_s", 30))) if rank == 0 else None
    for step in range(start_step, max_steps):
        t0 = time.perf_counter()
        seed_step(generator, seed, step, rank)
        data_wait, loss_sum, extra = 0.0, torch.zeros((), device=device), {}
        for i in range(accum):
            t_data = time.perf_counter()
            batch = to_device(next(batches), device)
            data_wait += time.perf_counter() - t_data
            with strategy.sync_context(model, last_micro_batch=i == accum - 1):
                with strategy.autocast():
                    loss, logs = task.loss(model, batch, generator)
                strategy.backward(model, loss)
            loss_sum += loss.detach().float()  # stays on the device: no host sync per micro-batch
            for k, v in logs.items():
                extra[k] = extra.get(k, 0.0) + float(v) / accum
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = strategy.optimizer_step(model, optimizer)
        scheduler.step()
        ema.update(strategy.local_params(model))
        done = step + 1
        window.add(time.perf_counter() - t0, data_wait, loss_sum / accum, grad_norm, extra)

        metrics = {"step": done, "lr": lr, "resumed_from_step": start_step}
        if done % int(tc.log_every) == 0 or done == max_steps:
            metrics.update(_log_window(window, logger, done, micro * world_size * accum, device, lr))
            if progress is not None:
                progress.update(done, metrics["loss"], metrics["step_time_s"])
        evaluate = int(tc.get("eval_every") or 0) > 0 and done % int(tc.eval_every) == 0
        if evaluate or (int(tc.sample_every) > 0 and done % int(tc.sample_every) == 0):
            _log_samples(task, strategy, model, ema, done, logger, run_dir, rank, cfg if evaluate else None)
        if done % int(tc.checkpoint_every) == 0 or done == max_steps:
            _report_checkpoint(done, rank, strategy, model, optimizer, scheduler, ema, generator, meta, metrics)

    final_dir = storage.join(run_dir, "final")
    if not final_export.is_final(final_dir, max_steps):
        full = strategy.full_state_dict(model)
        ema_full = strategy.gather_full(model, ema.shadow)
        if rank == 0:
            info = final_export.final_info(cfg, config["stage"], max_steps, task.lineage_tags(),
                                           meta["config_hash"])
            # Evaluation logs back into the run that trained these weights.
            info["inputs_hash"] = meta["inputs_hash"]  # what stage_inputs names a changed start by
            info["mlflow_run_id"] = config.get("run_id")
            info["mlflow_tracking_uri"] = config.get("tracking_uri")
            final_export.export_final(task, full, ema_full, final_dir, info, logger)
    if batches is not None and hasattr(batches, "close"):
        batches.close()
    ray.train.report({"step": max_steps, "final": 1, "resumed_from_step": start_step})


def _as_uri(checkpoint) -> str:
    """A local path, or ``scheme://path`` for a checkpoint on an object store."""
    import pyarrow.fs as pafs

    fs = checkpoint.filesystem
    if isinstance(fs, pafs.LocalFileSystem):
        return checkpoint.path
    return f"{fs.type_name}://{checkpoint.path}"


def _log_window(window: _Window, logger: WorkerLogger, step: int, images_per_step: int, device, lr: float) -> dict:
    n = max(1, window.steps)
    loss, grad_norm = _mean_across_ranks([float(window.loss) / n, float(window.grad_norm) / n])
    step_time = window.step_time / n
    metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": step_time,
               "samples_per_s": images_per_step / step_time if step_time > 0 else 0.0,
               "data_wait_fraction": window.data_wait / window.step_time if window.step_time > 0 else 0.0,
               "memory_gb": memory_gb(device)}
    metrics.update({f"loss/{k}": v / n for k, v in window.extra.items()})
    logger.log_metrics(metrics, step)
    window.reset()
    return metrics


def _log_samples(task, strategy, model, ema, step, logger, run_dir, rank, eval_cfg=None) -> None:
    """Sample the fixed prompts with the EMA weights on rank 0; the gather is collective. With ``eval_cfg`` the
    same images are also scored against held-out images (FID / IS / CLIP score, `train.eval_every`)."""
    ema_full = strategy.gather_full(model, ema.shadow)
    if rank != 0:
        return
    sampler = task.build_model()
    sampler.load_state_dict(ema_full, strict=False)
    sampler.to(strategy.device).eval()
    with torch.no_grad(), strategy.autocast():
        images = task.sample_images(sampler, step)
    png = grid_png_bytes(images)
    name = sample_artifact_name(step)
    storage.write_bytes_atomic(storage.join(run_dir, "samples", name), png)
    logger.log_file_bytes(png, "samples", name)
    if eval_cfg is not None:
        _log_evaluation(images, sampler, step, eval_cfg, logger)
    del sampler


def _log_evaluation(images, sampler, step, cfg, logger) -> None:
    """A small periodic evaluation; a failure is logged, never fatal to a run that may have days left."""
    from stages.evaluate.stage import evaluate_in_training

    try:
        scores = evaluate_in_training(lambda _model, _step: images, sampler, step, cfg)
    except Exception:  # noqa: BLE001 - evaluation must not end training
        log.exception("in-training evaluation at step %d failed; training continues", step)
        return
    logger.log_metrics({k.replace("/", "_"): float(v) for k, v in scores.items() if v is not None}, step)


def _report_checkpoint(step, rank, strategy, model, optimizer, scheduler, ema, generator, meta, metrics) -> None:
    import ray.train
    from ray.train import Checkpoint

    tmp = tempfile.mkdtemp(prefix=f"ckpt-{step:09d}-rank{rank}-")
    try:
        checkpointing.save_checkpoint(tmp, step=step, strategy=strategy, model=model, optimizer=optimizer,
                                      scheduler=scheduler, ema=ema, generator=generator, meta=meta)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpointing.checkpoint_dir_name(step))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
