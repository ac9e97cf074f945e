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


def test_chain_runs_then_skips_then_reruns_what_changed(tmp_path):
    root = tmp_path / "root"
    first = _run_chain(root, [])
    assert set(first["stages"]) == {"demo_data", "model_summary"}
    assert not any(r.get("skipped") for r in first["stages"].values())
    assert first["stages"]["model_summary"]["parameters"]["unet_base"] > 0
    assert storage.exists(str(root / "workflow" / "demo" / "demo_data.json"))

    second = _run_chain(root, [])
    assert all(r.get("skipped") for r in second["stages"].values())

    # A different config for one stage re-runs that stage only.
    third = _run_chain(root, ["demo.seed=1"])
    assert not third["stages"]["demo_data"].get("skipped")

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("sdxl")
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_id for r in runs if r.info.run_name == "demo"}
    children = [r for r in runs if r.info.run_name in ("demo_data", "model_summary")]
    assert len(parents) == 3 and children
    assert all(r.data.tags.get("mlflow.parentRunId") in parents for r in children)


def test_missing_output_makes_a_stage_run_again(tmp_path):
    root = tmp_path / "root"
    _run_chain(root, [])
    # The registry names demo_data's completion marker as its output: with the folder gone, the chain re-runs it.
    storage.remove(str(root / "demo_images"))
    again = _run_chain(root, [])
    assert not again["stages"]["demo_data"].get("skipped")
    assert again["stages"]["model_summary"].get("skipped")
