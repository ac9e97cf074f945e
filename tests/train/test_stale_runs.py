"""A training stage whose inputs changed (a retrained parent, another VAE, other data) starts over instead of
continuing, or simply keeping, the weights it made from the old inputs; the old run is moved aside, not deleted."""

import glob
import json
import os
import time

import pytest
from omegaconf import OmegaConf

from pipeline import storage
from pipeline.context import StageContext
from stages.train.stage_inputs import (inputs_hash, set_aside_finished_run, set_aside_stale_run, stage_inputs,
                                      weights_identity)
from tests.train.toy_task import toy_cfg


def _fake_final(root: str, stage: str, run_id: str) -> str:
    """<root>/runs/<stage>/final/ema with a weights file and the final/info.json a finished stage leaves."""
    ema = os.path.join(root, "runs", stage, "final", "ema")
    os.makedirs(ema, exist_ok=True)
    with open(os.path.join(ema, "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(b"weights")
    with open(os.path.join(root, "runs", stage, "final", "info.json"), "w") as f:
        json.dump({"stage": stage, "step": 4, "mlflow_run_id": run_id}, f)
    return ema


def _fake_run(run_dir: str, recorded: str | None, with_final: bool = True) -> None:
    paths = [os.path.join(run_dir, "checkpoint_000000002", "meta.json")]
    paths += [os.path.join(run_dir, "final", "info.json")] if with_final else []
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"step": 2, **({"inputs_hash": recorded} if recorded else {})}, f)


def test_a_retrained_parent_changes_the_inputs(tmp_path):
    root = str(tmp_path)
    parent = _fake_final(root, "parent", run_id="first")
    cfg = toy_cfg(root, init_from=parent)
    before = stage_inputs(cfg)
    assert set(before) == {"init"} and before["init"].startswith(parent + "@sha256:")
    assert stage_inputs(cfg) == before  # stable while nothing changed
    _fake_final(root, "parent", run_id="second")  # same path, same weights file, another training run
    assert stage_inputs(cfg)["init"] != before["init"]
    assert stage_inputs(toy_cfg(root)) == {}  # from scratch: nothing to start from


def test_a_plain_weights_folder_is_named_by_its_weights(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"a")
    first = weights_identity(str(folder))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"b")
    assert weights_identity(str(folder)) != first


def test_a_diffusion_stage_names_its_vae_text_encoders_and_manifest(tmp_path):
    from tests.train.shard_fixtures import stage_cfg, write_dataset

    root = str(tmp_path / "root")
    write_dataset(os.path.join(root, "data", "default"), {(64, 64): 4})
    cfg = OmegaConf.merge({"train": OmegaConf.load("pipeline/conf/train/default.yaml")}, stage_cfg("pretrain256", root))
    inputs = stage_inputs(cfg)
    assert set(inputs) == {"vae", "text_encoders", "manifest_sha256"}
    assert inputs["vae"].startswith("preset:") and inputs["text_encoders"].startswith("random:tiny@")


def test_a_run_from_other_inputs_is_moved_aside_and_the_same_inputs_kept(tmp_path):
    run_dir = str(tmp_path / "runs" / "child")
    final = os.path.join(run_dir, "final")
    _fake_run(run_dir, "aaaa")
    assert set_aside_stale_run(run_dir, final, "aaaa", {}) is None
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_000000002"))
    moved = set_aside_stale_run(run_dir, final, "bbbb", {"init": "x"})
    assert moved and os.path.basename(moved).startswith("child.replaced-")
    assert not os.path.exists(run_dir)
    assert os.path.isfile(os.path.join(moved, "checkpoint_000000002", "meta.json"))
    assert os.path.isfile(os.path.join(moved, "final", "info.json"))


def _checkpoint(run_dir: str, step: int, recipe: str | None) -> None:
    path = os.path.join(run_dir, f"checkpoint_{step:09d}", "meta.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"step": step, "config_hash": "any", **({"recipe_hash": recipe} if recipe else {})}, f)


def test_the_recipe_is_what_changes_the_training_not_where_it_lives():
    from stages.train.checkpointing import recipe_hash

    def recipe(**train):
        return recipe_hash(OmegaConf.to_container(toy_cfg("/somewhere", **train), resolve=True))

    base = recipe()
    assert recipe_hash(OmegaConf.to_container(toy_cfg("/moved/root"), resolve=True)) == base
    assert recipe(log_every=7, checkpoint_every=3, storage_path="/elsewhere", max_steps=9) == base
    assert recipe(lr=5e-3) != base and recipe(global_batch_size=16) != base and recipe(t_range=[0, 500]) != base
    moved_model = OmegaConf.to_container(toy_cfg("/somewhere"), resolve=True)
    moved_model["model"]["preset"] = "full"
    assert recipe_hash(moved_model) != base
    # The autoencoder's loss terms are its recipe, and only its own: a base run ignores train.vae.
    for task, changes in (("vae", True), ("base", False)):
        cfg = OmegaConf.to_container(toy_cfg("/somewhere"), resolve=True)
        cfg["train"].update(task=task, vae={"edge_weight": 0.0})
        before = recipe_hash(cfg)
        cfg["train"]["vae"]["edge_weight"] = 1.0
        assert (recipe_hash(cfg) != before) == changes


def test_a_run_finished_under_another_config_is_moved_aside(tmp_path):
    run_dir = str(tmp_path / "runs" / "child")
    final = os.path.join(run_dir, "final")
    _checkpoint(run_dir, 300, "old")
    _checkpoint(run_dir, 600, "old")
    # Same config: a finished run is kept (a re-run returns it); more steps under another config continue it.
    assert set_aside_finished_run(run_dir, final, "old", 600) is None
    assert set_aside_finished_run(run_dir, final, "new", 900) is None
    assert os.path.isdir(run_dir)
    moved = set_aside_finished_run(run_dir, final, "new", 600)  # nothing left to train under the new settings
    assert moved and not os.path.exists(run_dir)
    assert os.path.isfile(os.path.join(moved, "checkpoint_000000600", "meta.json"))


def test_a_checkpoint_without_a_config_hash_is_continued(tmp_path):
    run_dir = str(tmp_path / "runs" / "child")
    _checkpoint(run_dir, 600, None)
    assert set_aside_finished_run(run_dir, os.path.join(run_dir, "final"), "new", 600) is None
    assert set_aside_finished_run(str(tmp_path / "nothing"), str(tmp_path / "nothing" / "final"), "new", 1) is None


def _age(path: str, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))


def test_a_run_from_before_inputs_were_recorded_is_continued_unless_its_parent_is_newer(tmp_path):
    root = str(tmp_path)
    parent = _fake_final(root, "parent", run_id="first")
    run_dir = os.path.join(root, "runs", "child")
    final = os.path.join(run_dir, "final")
    _fake_run(run_dir, None)
    _age(os.path.join(root, "runs", "parent", "final", "info.json"), 3600)  # the parent was made before the run
    assert set_aside_stale_run(run_dir, final, "bbbb", {}, parent=parent) is None
    assert set_aside_stale_run(run_dir, final, "bbbb", {}) is None
    assert os.path.isdir(run_dir)
    for record in (os.path.join(run_dir, "checkpoint_000000002", "meta.json"), os.path.join(final, "info.json")):
        _age(record, 7200)  # now the parent was retrained after the run
    moved = set_aside_stale_run(run_dir, final, "bbbb", {}, parent=parent)
    assert moved and not os.path.exists(run_dir)


def test_a_final_folder_outside_the_checkpoint_storage_moves_with_it(tmp_path):
    run_dir = str(tmp_path / "ray_storage" / "child")
    _fake_run(run_dir, "aaaa", with_final=False)
    final = str(tmp_path / "root" / "runs" / "child" / "final")
    os.makedirs(final)
    with open(os.path.join(final, "info.json"), "w") as f:
        json.dump({"inputs_hash": "aaaa"}, f)
    moved = set_aside_stale_run(run_dir, final, "bbbb", {})
    assert not os.path.exists(final) and os.path.isfile(os.path.join(moved, "final", "info.json"))


def test_move_on_an_object_store(s3_bucket):
    src, dst = f"{s3_bucket}/runs/child", f"{s3_bucket}/runs/child.replaced-1"
    storage.write_bytes_atomic(f"{src}/checkpoint_000000002/meta.json", b"{}")
    storage.write_bytes_atomic(f"{src}/final/info.json", b"{}")
    storage.move(src, dst)
    assert storage.list_files(dst, recursive=True) == [f"{dst}/checkpoint_000000002/meta.json",
                                                       f"{dst}/final/info.json"]
    assert not storage.exists(f"{src}/final/info.json")
    with pytest.raises(FileExistsError):
        storage.write_bytes_atomic(f"{src}/x", b"1")
        storage.move(src, dst)


@pytest.mark.slow
def test_rerun_after_the_parent_was_retrained_starts_over(tmp_path, ray_local):
    from stages.train.trainer import run_training

    root = str(tmp_path / "root")
    parent = _fake_final(root, "parent", run_id="first")
    ctx = StageContext(root=root, stage="child")
    cfg = toy_cfg(root, init_from=parent, max_steps=2)
    first = run_training(cfg, ctx)
    assert first["step"] == 2
    info = storage.read_json(os.path.join(root, "runs", "child", "final", "info.json"))
    assert info["inputs_hash"] == inputs_hash(stage_inputs(cfg))

    _fake_final(root, "parent", run_id="second")  # the parent stage ran again
    second = run_training(cfg, ctx)
    # Without the check this run would find final/ at step 2 and keep the weights made from the old parent.
    assert second["step"] == 2 and second["metrics"]["resumed_from_step"] == 0
    assert storage.read_json(os.path.join(root, "runs", "child", "final", "info.json"))["inputs_hash"] != \
        info["inputs_hash"]
    (moved,) = glob.glob(os.path.join(root, "runs", "child.replaced-*"))
    assert storage.read_json(os.path.join(moved, "final", "info.json"))["inputs_hash"] == info["inputs_hash"]


@pytest.mark.slow
def test_rerun_of_a_finished_stage_under_changed_settings_trains_again(tmp_path, ray_local):
    from stages.train.trainer import run_training

    root = str(tmp_path / "root")
    ctx = StageContext(root=root, stage="child")
    info_path = os.path.join(root, "runs", "child", "final", "info.json")
    assert run_training(toy_cfg(root, max_steps=2), ctx)["step"] == 2
    first = storage.read_json(info_path)
    mtime = os.path.getmtime(info_path)
    # The same recipe (only how often it logs changed): the finished run is handed back untouched.
    run_training(toy_cfg(root, max_steps=2, log_every=2), ctx)
    assert os.path.getmtime(info_path) == mtime and not glob.glob(os.path.join(root, "runs", "child.replaced-*"))
    # Another learning rate at the same max_steps: without the check this resumed step 2, trained nothing and kept
    # the old weights (and their final/info.json) as the new settings' result.
    assert run_training(toy_cfg(root, max_steps=2, lr=5e-3), ctx)["step"] == 2
    second = storage.read_json(info_path)
    assert second["config_hash"] != first["config_hash"] and second["step"] == 2
    (moved,) = glob.glob(os.path.join(root, "runs", "child.replaced-*"))
    assert storage.read_json(os.path.join(moved, "final", "info.json"))["config_hash"] == first["config_hash"]
