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

    # A different config for the last step re-runs it alone; for an earlier step, it and every step after it (a
    # later step reads what the earlier ones wrote).
    third = _run_chain(root, ['+workflow.overrides.model_summary=["preset=full"]'])
    assert third["stages"]["demo_data"] == {"skipped": True} and not third["stages"]["model_summary"].get("skipped")
    assert _child_runs(root) == {"demo": 3, "demo_data": 1, "model_summary": 2}
    fourth = _run_chain(root, ['+workflow.overrides.model_summary=["preset=full"]',
                               '+workflow.overrides.demo_data=["demo.seed=1"]'])
    assert not fourth["stages"]["demo_data"].get("skipped")
    assert not fourth["stages"]["model_summary"].get("skipped")
    assert _child_runs(root) == {"demo": 4, "demo_data": 2, "model_summary": 3}

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sdxl").experiment_id])
    parents = {r.info.run_id for r in runs if r.info.run_name == "demo"}
    children = [r for r in runs if r.info.run_name in ("demo_data", "model_summary")]
    assert len(parents) == 4 and len(children) == 5
    assert all(r.data.tags.get("mlflow.parentRunId") in parents for r in children)


def test_missing_output_makes_a_stage_run_again(tmp_path):
    root = tmp_path / "root"
    _run_chain(root, [])
    # The registry names demo_data's completion marker as its output: with the folder gone, the chain re-runs it.
    storage.remove(str(root / "demo_images"))
    again = _run_chain(root, [])
    assert not again["stages"]["demo_data"].get("skipped")
    assert not again["stages"]["model_summary"].get("skipped")  # its input was made again
    assert _child_runs(root) == {"demo": 2, "demo_data": 2, "model_summary": 2}


def test_the_command_line_wins_over_the_chains_per_step_overrides():
    from pipeline.workflow import compose_stage_config

    with initialize_config_dir(config_dir=CONF, version_base=None):
        recipe = compose_stage_config("train_vae", [], ["train.max_steps=800", "train.lr=0.002"])
        user = compose_stage_config("train_vae", ["train.max_steps=2", "stage=demo"], ["train.max_steps=800",
                                                                                          "train.lr=0.002"])
    assert recipe.train.max_steps == 800 and recipe.train.lr == 0.002
    assert user.train.max_steps == 2 and user.train.lr == 0.002  # only what the user named is replaced


def test_a_chain_override_reaches_the_steps_that_have_its_key():
    """`stage=demo +cache.num_actors=1`: the `+` gets the key past the demo's own config; the cache steps get
    `cache.num_actors=1` (their per-step value is replaced, not appended to), the training steps, without a `cache`
    section, are left alone, and group choices and keys every stage has reach every step."""
    from pipeline.workflow import applicable_overrides, compose_stage_config

    user = ["+cache.num_actors=1", "train.max_steps=3", "preset=tiny", "stage=demo", "workflow.chain=[data]"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        assert applicable_overrides("cache_latents", user, ["cache.num_actors=2"]) == [
            "cache.num_actors=1", "train.max_steps=3", "preset=tiny"]
        assert applicable_overrides("train_vae", user, []) == ["train.max_steps=3", "preset=tiny"]
        assert compose_stage_config("cache_latents", user, ["cache.num_actors=2"]).cache.num_actors == 1
        trainer = compose_stage_config("train_vae", user, [])
    assert "cache" not in trainer and trainer.train.max_steps == 3


def test_the_users_root_is_the_chains_and_a_step_may_still_move_under_it():
    """`paths.root=/x` sets the chain's root (each step gets it first); a step that moves to its own root under it
    (stage=paper_effects gives each model one) keeps that root instead of being flattened back onto /x."""
    from pipeline.workflow import applicable_overrides, compose_stage_config

    user = ["paths.root=/x", "train.max_steps=3"]
    extra = ["paths.root=/x", "paths.root=/x/models/a"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        assert applicable_overrides("pretrain256", user, extra) == ["train.max_steps=3"]
        step = compose_stage_config("pretrain256", user, extra)
        plain = compose_stage_config("pretrain256", user, ["paths.root=/x"])
    assert step.paths.root == "/x/models/a" and step.train.max_steps == 3
    assert plain.paths.root == "/x"


def test_a_chain_refuses_an_override_no_step_has(tmp_path):
    """A key no step of the chain has (here handed to the workflow directly, past Hydra's own check of the command
    line) stops the chain before any step runs, instead of being dropped."""
    import pytest

    root = str(tmp_path / "root")
    overrides = [f"paths.root={root}", "stage=demo", "workflow.chain=[demo_data,model_summary]", "demo.num_images=4"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
        with pytest.raises(ValueError, match=r"no step of the chain has a key for \['demo.num_imagez=3'\]"):
            execute("demo", cfg, overrides=[*overrides[:2], overrides[3], "demo.num_imagez=3"])
    assert not os.path.exists(os.path.join(root, "workflow", "demo", "demo_data.json"))


def test_learning_check_goals_name_each_miss_and_refuse_unknown_scores():
    import pytest

    from pipeline.workflow import check_goals

    scores = {"background_accuracy": 0.5, "background_chance": 1 / 6, "background_lightness_auc": 0.7,
              "background_lightness_chance": 0.5, "object_color_accuracy": 0.2}
    verdict = check_goals(scores, {"background_accuracy": 0.3, "background_lightness_auc": 0.9})
    assert not verdict["passed"]
    assert verdict["checks"]["background_accuracy"] == {"value": 0.5, "goal": 0.3, "chance": 1 / 6, "met": True}
    assert verdict["checks"]["background_lightness_auc"]["met"] is False
    assert check_goals(scores, {"background_accuracy": 0.5})["passed"]  # the goal itself is met
    assert not check_goals({**scores, "background_lightness_auc": None}, {"background_lightness_auc": 0.5})["passed"]
    with pytest.raises(KeyError, match="learning_check.goals.fid"):
        check_goals(scores, {"fid": 1.0})


def test_the_learning_check_writes_under_its_own_root(tmp_path):
    import subprocess
    import sys

    import yaml

    run = os.path.join(CONF, "..", "run.py")
    printed = subprocess.run([sys.executable, run, "stage=learning_check", "--cfg", "job", "--resolve"], check=True,
                             capture_output=True, text=True, env={**os.environ, "SDXL_ROOT": str(tmp_path)}).stdout
    cfg = yaml.safe_load(printed)
    assert cfg["paths"]["root"] == f"{tmp_path}/learning_check"  # never the demo's runs
    assert cfg["workflow"]["chain"][-1] == "evaluate"
    assert set(cfg["learning_check"]["goals"]) == {"background_lightness_auc"}


def test_every_step_gets_the_chains_shared_overrides_before_its_own_and_the_user_wins_over_both():
    """`workflow.every_step` (the demo's `model.preset=micro`) reaches every step, the Serve app included; a step's
    own list comes after it and wins; the user's command line wins over both."""
    from pipeline.workflow import chain_steps, compose_stage_config

    with initialize_config_dir(config_dir=CONF, version_base=None):
        demo = compose(config_name="config", overrides=["stage=demo", "paths.root=/x"])
        steps = {step: (stage, extra) for step, stage, extra in chain_steps(demo, "/x")}
        assert all(extra[:2] == ["paths.root=/x", "model.preset=micro"] for _, extra in steps.values())
        stage, extra = steps["generate"]
        assert compose_stage_config(stage, [], extra).serve.preset == "micro"
        stage, extra = steps["pretrain256"]
        assert compose_stage_config(stage, [], extra).model.preset == "micro"
        assert compose_stage_config(stage, ["model.preset=tiny"], extra).model.preset == "tiny"

        shared = compose(config_name="config", overrides=["stage=demo", "paths.root=/x",
                                                          'workflow.every_step=["model.preset=micro","train.lr=0.5"]'])
        lr = {step: compose_stage_config(stage, [], extra).train.lr
              for step, stage, extra in chain_steps(shared, "/x") if step in ("pretrain256", "evaluate")}
    assert lr == {"pretrain256": 1.0e-3, "evaluate": 0.5}  # pretrain256 sets its own rate; evaluate does not
