"""Chained workflows: each stage composed as the CLI would, nested MLflow runs, and skip-on-rerun markers."""

import os

import mlflow
from hydra import compose, initialize_config_dir

from pipeline import storage
from pipeline.dispatch import execute

CONF = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf"))


def _run_chain(root, extra):
    overrides = [f"paths.root={root}", "stage=demo", "workflow.chain=[demo_data,model_summary]",
                 "demo.num_images=12", *extra]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
        return execute("demo", cfg, overrides=[o for o in overrides if not o.startswith("workflow.")])


def _child_runs(root) -> dict[str, int]:
    """How many MLflow runs each chained stage has had: a skipped stage opens none."""
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("sdxl")
    names = [r.info.run_name for r in client.search_runs([experiment.experiment_id])]
    return {name: names.count(name) for name in ("demo", "demo_data", "model_summary")}


def test_chain_runs_then_skips_then_reruns_what_changed(tmp_path):
    root = tmp_path / "root"
    first = _run_chain(root, [])
    assert set(first["stages"]) == {"demo_data", "model_summary"}
    assert not any(r.get("skipped") for r in first["stages"].values())
    assert first["stages"]["model_summary"]["parameters"]["unet_base"] > 0
    marker = root / "workflow" / "demo" / "model_summary.json"
    finished = storage.read_json(str(marker))["finished_at"]
    assert _child_runs(root) == {"demo": 1, "demo_data": 1, "model_summary": 1}

    second = _run_chain(root, [])
    assert second["stages"] == {"demo_data": {"skipped": True}, "model_summary": {"skipped": True}}
    # Skipped for real: neither stage opened a run or rewrote its marker.
    assert _child_runs(root) == {"demo": 2, "demo_data": 1, "model_summary": 1}
    assert storage.read_json(str(marker))["finished_at"] == finished

    # A different config for one stage (a per-stage override of the chain) re-runs that stage only.
    third = _run_chain(root, ['+workflow.overrides.demo_data=["demo.seed=1"]'])
    assert not third["stages"]["demo_data"].get("skipped")
    assert third["stages"]["model_summary"] == {"skipped": True}
    assert _child_runs(root) == {"demo": 3, "demo_data": 2, "model_summary": 1}

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sdxl").experiment_id])
    parents = {r.info.run_id for r in runs if r.info.run_name == "demo"}
    children = [r for r in runs if r.info.run_name in ("demo_data", "model_summary")]
    assert len(parents) == 3 and len(children) == 3
    assert all(r.data.tags.get("mlflow.parentRunId") in parents for r in children)


def test_missing_output_makes_a_stage_run_again(tmp_path):
    root = tmp_path / "root"
    _run_chain(root, [])
    # The registry names demo_data's completion marker as its output: with the folder gone, the chain re-runs it.
    storage.remove(str(root / "demo_images"))
    again = _run_chain(root, [])
    assert not again["stages"]["demo_data"].get("skipped")
    assert again["stages"]["model_summary"] == {"skipped": True}
    assert _child_runs(root) == {"demo": 2, "demo_data": 2, "model_summary": 1}


def test_the_command_line_wins_over_the_chains_per_step_overrides():
    from pipeline.workflow import compose_stage_config

    with initialize_config_dir(config_dir=CONF, version_base=None):
        recipe = compose_stage_config("train_vae", [], ["train.max_steps=800", "train.lr=0.002"])
        user = compose_stage_config("train_vae", ["train.max_steps=2", "stage=demo"], ["train.max_steps=800",
                                                                                          "train.lr=0.002"])
    assert recipe.train.max_steps == 800 and recipe.train.lr == 0.002
    assert user.train.max_steps == 2 and user.train.lr == 0.002  # only what the user named is replaced
