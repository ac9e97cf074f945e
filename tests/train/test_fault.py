"""A training worker process dies mid-run; Ray Train restarts the group from the last checkpoint."""

import os

import pytest

from pipeline.context import StageContext
from tests.train.toy_task import assert_same_weights, final_weights, reference_run, toy_cfg


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(tmp_path, ray_local):
    from stages.train.trainer import run_training

    _, reference = reference_run()
    root = str(tmp_path / "root")
    marker = str(tmp_path / "killed.txt")
    snapshot = os.path.join(root, "runs", "fault", "checkpoint_manager_snapshot.json")
    cfg = toy_cfg(root, max_failures=1, toy={"kill_at_step": 3, "kill_rank": 1, "kill_marker": marker,
                                             "kill_wait_snapshot": snapshot,
                                             "kill_wait_checkpoint": "checkpoint_000000002"})
    out = run_training(cfg, StageContext(root=root, stage="fault"))
    assert os.path.exists(marker), "the worker was never killed"
    assert out["step"] == 4
    assert out["metrics"]["resumed_from_step"] == 2  # the restarted group loaded checkpoint_000000002
    for which in ("model", "ema"):
        assert_same_weights(final_weights(root, "fault", which), reference[which])
