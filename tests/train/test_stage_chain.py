"""The six training stages on shards made by the data stages, chained as the demo workflow runs them: each logs
params, metrics, a sample grid and an in-training evaluation to MLflow, registers its EMA weights, leaves a
checkpoint, and the finetunes really start from their parent's weights."""

from __future__ import annotations

import os

import mlflow
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from safetensors.torch import load_file

from pipeline.dispatch import execute

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

CONF = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf"))
TRAINING = ["train_vae", "pretrain256", "pretrain512", "finetune_aspect", "finetune_quality", "train_refiner"]
# The demo's chain up to the refiner: the longer base stages read latent caches made right before them.
CHAIN = ["demo_data", "data", "train_vae", "cache_32", "pretrain256", "cache_64", "pretrain512", "cache_64_aspect",
         "finetune_aspect", "finetune_quality", "train_refiner"]
# A vanishing lr (the schedule refuses 0) keeps a child stage's weights where they started, so its final weights
# must equal its parent's within float tolerance.
FROZEN_CHILDREN = {"pretrain512": "pretrain256", "finetune_aspect": "pretrain512", "finetune_quality": "finetune_aspect"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_local):
    root = str(tmp_path_factory.mktemp("chain") / "root")
    # Batches of 4 (the demo's 64 exceed 48 images; a cached bucket must hold one micro-batch).
    overrides = [f"paths.root={root}", "stage=demo", "demo.num_images=48", "train.max_steps=2",
                 "train.sample_every=2", "train.eval_every=2", "train.checkpoint_every=1", "train.warmup_steps=1",
                 "train.global_batch_size=4", "train.micro_batch_size=4"]
    child_overrides = {child: ["train.lr=1e-12", "train.min_lr=1e-13"] for child in FROZEN_CHILDREN}
    chain_list = "[" + ",".join(CHAIN) + "]"
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, f"workflow.chain={chain_list}"])
        with open_dict(cfg):
            for child, extra in child_overrides.items():
                cfg.workflow.overrides[child] = extra
            # only the cache steps have a `cache` section; after the demo's settings in the same list, so these win.
            # One encoding actor per cache: 48 images need no second one, and each actor imports the model stack.
            cfg.workflow.overrides["cache_64_aspect"].append("cache.min_bucket_samples=4")
            for cache in ("cache_32", "cache_64", "cache_64_aspect"):
                cfg.workflow.overrides[cache].append("cache.num_actors=1")
        result = execute("demo", cfg, overrides=[o for o in overrides if o != "stage=demo"])
    return root, result


def _final_tensors(root: str, stage: str, which: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(root, "runs", stage, "final", which, "diffusion_pytorch_model.safetensors"))


def test_every_stage_logs_params_metrics_grid_and_a_model_version(chain):
    root, result = chain
    assert set(TRAINING) <= set(result["stages"])
    # the cached stages trained on every image, encoded by the VAE train_vae left
    for cache in ("cache_32", "cache_64", "cache_64_aspect"):
        assert result["stages"][cache]["samples"] == 48, cache
        info = os.path.join(result["stages"][cache]["cache_dir"], "cache_info.json")
        assert "runs/train_vae/final" in open(info).read(), cache
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("sdxl")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    threads = {}
    for stage in TRAINING:
        run = runs[stage]
        assert run.info.status == "FINISHED", stage
        assert run.data.params["train.max_steps"] == "2"
        # A worker runs as many torch threads as CPUs it reserved (the demo gives its steps both cores), whatever
        # OMP_NUM_THREADS the driver has: the suite's 1 made them single-threaded.
        threads[stage] = int(run.data.tags["train.torch_threads"])
        assert threads[stage] == int(float(run.data.params["cluster.cpus_per_worker"])), stage
        assert "loss" in run.data.metrics and "lr" in run.data.metrics, stage
        assert "eval_fid" in run.data.metrics, f"{stage}: no in-training evaluation logged"
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert samples, f"{stage}: no sample grid logged"
        checkpoints = [n for n in os.listdir(os.path.join(root, "runs", stage)) if n.startswith("checkpoint_")]
        assert checkpoints, f"{stage}: no checkpoint"
    assert threads["pretrain256"] == 2 and os.environ.get("OMP_NUM_THREADS") == "1", threads
    versions = {name: client.search_model_versions(f"name='{name}'") for name in ("base", "refiner", "vae")}
    assert len(versions["vae"]) == 1 and len(versions["refiner"]) == 1
    assert len(versions["base"]) == 4  # pretrain256, pretrain512, finetune_aspect, finetune_quality


def test_finetunes_start_from_their_parents_weights(chain):
    root, _ = chain
    for child, parent in FROZEN_CHILDREN.items():
        parent_ema = _final_tensors(root, parent, "ema")
        child_model = _final_tensors(root, child, "model")
        assert parent_ema.keys() == child_model.keys()
        for key, value in parent_ema.items():
            torch.testing.assert_close(child_model[key], value, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, c=child, k=key: f"{c}:{k} differs from {parent}: {m}")
    # A stage that trains (lr > 0) moves its weights, so its raw weights and their EMA part ways.
    trained = _final_tensors(root, "pretrain256", "model")
    assert any(not torch.equal(trained[k], v) for k, v in _final_tensors(root, "pretrain256", "ema").items())


def test_refiner_trains_on_its_own_architecture(chain):
    root, _ = chain
    base = _final_tensors(root, "pretrain256", "ema")
    refiner = _final_tensors(root, "train_refiner", "ema")
    assert base.keys() != refiner.keys()
