"""Each strategy trains the toy task on 2 Ray Train workers (gloo, CPU), then resumes from its own checkpoint."""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.context import StageContext
from stages.train.loop import accumulation_steps, derive_seed
from stages.train.strategies import deepspeed_config, make_strategy
from tests.cluster.helpers import REPO
from tests.train.toy_task import assert_same_weights, final_weights, reference_run, toy_cfg


def test_accumulation_keeps_the_global_batch():
    assert accumulation_steps(2048, 8, 256) == 1
    assert accumulation_steps(2048, 4, 64) == 8
    assert accumulation_steps(8, 2, 1) == 4
    with pytest.raises(ValueError, match=r"train.global_batch_size=10 is not divisible .* 4 × 2 = 8"):
        accumulation_steps(10, 4, 2)


def test_seeds_depend_on_seed_step_and_rank():
    seeds = {derive_seed(s, t, r) for s in (0, 1) for t in (0, 1) for r in (0, 1)}
    assert len(seeds) == 8
    assert derive_seed(3, 5, 1) == derive_seed(3, 5, 1)


def test_deepspeed_config_is_consistent():
    c = deepspeed_config(micro_batch_size=4, accumulation=8, world_size=64, zero_stage=3, grad_clip=1.0, bf16=True)
    assert c["train_batch_size"] == 2048 and c["zero_optimization"]["stage"] == 3
    assert c["bf16"]["enabled"] and c["gradient_clipping"] == 1.0 and c["zero_allow_untested_optimizer"]
    cpu = deepspeed_config(micro_batch_size=2, accumulation=2, world_size=2, zero_stage=1, grad_clip=1.0, bf16=False)
    assert not cpu["bf16"]["enabled"]


@pytest.mark.slow  # a fresh process importing DeepSpeed and probing its ops: ~10 s
def test_deepspeed_on_cpu_does_not_compile_its_shared_memory_allreduce(tmp_path):
    """The op only serves DeepSpeed's inference all-reduce; building it cost ~30 s of C++ per fresh machine."""
    import subprocess
    import sys

    code = ("from stages.train.strategies import skip_cpu_shm_allreduce_build\n"
            "skip_cpu_shm_allreduce_build()\n"
            "from deepspeed.comm.torch import build_shm_op\n"
            "assert build_shm_op() is None\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "ext" / "deepspeed_shm_comm").exists()


def test_unknown_strategy_names_the_key():
    cfg = OmegaConf.create({"strategy": "horovod", "grad_clip": 1.0, "mixed_precision": "bf16"})
    with pytest.raises(ValueError, match="train.strategy"):
        make_strategy(cfg, torch.device("cpu"), 1, 1)
    cfg = OmegaConf.create({"strategy": "deepspeed", "zero_stage": 0, "grad_clip": 1.0, "mixed_precision": "bf16"})
    with pytest.raises(ValueError, match="train.zero_stage"):
        make_strategy(cfg, torch.device("cpu"), 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra", [
    ("ddp", {}),
    ("fsdp", {"activation_checkpointing": True}),
    ("deepspeed", {"zero_stage": 1}),
    ("deepspeed", {"zero_stage": 2}),
    ("deepspeed", {"zero_stage": 3}),
], ids=["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_train_then_resume_matches_a_straight_run(tmp_path, ray_local, strategy, extra):
    from stages.train.trainer import run_training

    _, reference = reference_run()
    root = str(tmp_path / "root")
    ctx = StageContext(root=root, stage=f"toy_{strategy}")
    first = run_training(toy_cfg(root, strategy=strategy, max_steps=2, **extra), ctx)
    assert first["step"] == 2 and first["metrics"]["resumed_from_step"] == 0
    # Same stage again with more steps: Ray Train hands the workers the latest checkpoint (step 2).
    second = run_training(toy_cfg(root, strategy=strategy, max_steps=4, **extra), ctx)
    assert second["step"] == 4 and second["metrics"]["resumed_from_step"] == 2
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_fraction", "memory_gb"):
        assert key in second["metrics"]
    for which in ("model", "ema"):
        assert_same_weights(final_weights(root, ctx.stage, which), reference[which])
    with open(os.path.join(root, "runs", ctx.stage, "final", "info.json")) as f:
        info = json.load(f)
    assert info["step"] == 4 and info["stage"] == ctx.stage and info["lineage"]["task"] == "toy"
    with open(os.path.join(second["checkpoint"], "meta.json")) as f:
        meta = json.load(f)
    assert meta["strategy"] == strategy
    if strategy == "deepspeed":
        assert meta["zero_stage"] == extra["zero_stage"]


@pytest.mark.slow
def test_real_base_task_trains_and_exports_diffusers_weights(tmp_path, ray_local):
    """stage pretrain256 at the tiny preset with the real task and shard loader, FSDP on 2 workers."""
    from diffusers import UNet2DConditionModel

    from stages.train.trainer import run_training
    from tests.train.shard_fixtures import stage_cfg, write_dataset

    root = str(tmp_path / "root")
    write_dataset(os.path.join(root, "data", "default"), {(64, 64): 8})
    train = OmegaConf.load("pipeline/conf/train/default.yaml")
    cfg = OmegaConf.merge(
        {"train": train, "cluster": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1}},
        stage_cfg("pretrain256", root),
        {"train": {"strategy": "fsdp", "max_steps": 2, "global_batch_size": 4, "micro_batch_size": 1,
                   "checkpoint_every": 2, "log_every": 1, "sample_every": 2, "max_failures": 0,
                   "sample": {"prompts": ["a red cube"], "steps": 2}},
         "loader": {"num_workers": 1}})
    out = run_training(cfg, StageContext(root=root, stage="pretrain256"))
    assert out["step"] == 2 and out["metrics"]["loss"] > 0
    final = os.path.join(root, "runs", "pretrain256", "final")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(final, "ema"))
    assert unet.config.cross_attention_dim == 96  # the tiny base: CLIP-L 32 ‖ bigG 64
    assert os.path.exists(os.path.join(root, "runs", "pretrain256", "samples", "step_000002.png"))


def test_cluster_settings_and_trainer_config(tmp_path, make_ctx):
    from stages.train.trainer import build_trainer, cluster_settings, loop_config, storage_path

    cfg = toy_cfg(str(tmp_path / "root"), workers=3)
    assert cluster_settings(cfg)["num_workers"] == 3
    ctx = make_ctx("pretrain256")
    assert storage_path(cfg, ctx) == os.path.abspath(os.path.join(ctx.root, "runs"))
    config = loop_config(cfg, ctx)
    assert config["stage"] == "pretrain256" and config["cfg"]["train"]["max_steps"] == 4
    json.dumps(config)  # a plain, picklable/JSON-able dict for the workers
    trainer = build_trainer(cfg, ctx)
    assert trainer.scaling_config.num_workers == 3
    # Ray Train's own INFO lines (worker group start, every checkpoint report) stay in its log files by default.
    assert trainer.run_config.logging_config.log_level == "WARNING"
    chatty = build_trainer(OmegaConf.merge(cfg, {"train": {"ray_log_level": "info"}}), ctx)
    assert chatty.run_config.logging_config.log_level == "INFO"
    with pytest.raises(ValueError, match="cluster.num_workers"):
        cluster_settings(OmegaConf.merge(cfg, {"cluster": {"num_workers": 0}}))
