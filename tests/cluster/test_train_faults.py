"""A training stage's driver SIGKILLed after a checkpoint exists, then re-submitted with the same command: it resumes
from the latest checkpoint Ray Train recorded (not from step 0) and finishes at ``train.max_steps``.

"Recorded": Ray Train V2 resumes from the checkpoints listed in ``<run>/checkpoint_manager_snapshot.json``. A
checkpoint folder written but not yet listed when the driver dies is not used (the re-run starts over from the last
listed one, or from scratch) — see the cluster report.

(Killing one worker of a running group is covered by tests/train/test_fault.py.)
"""

from __future__ import annotations

import json
import re

import pytest

from tests.cluster.helpers import (
    kill_tree,
    mlflow_runs,
    require_stage,
    run_stage,
    start_stage,
    wait_for,
)
from tests.train.shard_fixtures import write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.integration]
MAX_STEPS = 10
CHECKPOINT_EVERY = 2
_STEP_RE = re.compile(r"^checkpoint_(\d+)$")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the checkpoints a run reported


def _recorded_checkpoints(run_dir) -> list[int]:
    """Steps of the checkpoints Ray Train has recorded in its run folder's snapshot (what a re-run resumes from)."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    except (OSError, ValueError):  # not written yet, or being rewritten
        return []
    names = [r.get("checkpoint_dir_name", "") for r in snapshot.get("checkpoint_results", [])]
    return sorted(int(m.group(1)) for m in map(_STEP_RE.match, names) if m)


def test_killed_training_driver_resumes_from_latest_checkpoint(tmp_path):
    require_stage("pretrain256")
    root = tmp_path / "root"
    # A dataset in the data stages' output format, written directly (the data stage's CLI runs in other tests).
    write_dataset(str(root / "data" / "default"), {(64, 64): 8})

    args = ["preset=tiny", "ray.num_cpus=2", f"paths.root={root}", f"train.max_steps={MAX_STEPS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_checkpoints=3", "train.log_every=1",
            "cluster.num_workers=1"]
    run_dir = root / "runs" / "pretrain256"
    log = tmp_path / "train.log"
    proc = start_stage("pretrain256", args, log)
    try:
        wait_for(lambda: _recorded_checkpoints(run_dir), 400, "a first checkpoint recorded by Ray Train",
                 interval_s=0.1, proc=proc, log_path=log)
    finally:
        kill_tree(proc)
    at_kill = _recorded_checkpoints(run_dir)
    assert not (run_dir / "final" / "info.json").exists(), "training finished before the kill: the test proves nothing"
    assert at_kill and max(at_kill) < MAX_STEPS

    summary = run_stage("pretrain256", args, tmp_path / "train-rerun.log").check()

    resumed = summary["metrics"]["resumed_from_step"]
    print(f"checkpoints recorded at the kill: {at_kill}; the re-run resumed from step {resumed}")
    # The latest recorded one (a later one may have been recorded between our look and the kill).
    assert resumed >= max(at_kill), f"resumed from step {resumed}, checkpoints recorded at the kill: {at_kill}"
    assert CHECKPOINT_EVERY <= resumed < MAX_STEPS
    assert summary["step"] == MAX_STEPS
    info = json.loads((run_dir / "final" / "info.json").read_text())
    assert info["step"] == MAX_STEPS
    assert max(_recorded_checkpoints(run_dir)) == MAX_STEPS
    # The killed run stays unfinished in MLflow; the re-run logs only the steps after the checkpoint it resumed from.
    runs = mlflow_runs(f"sqlite:///{root / 'mlflow.db'}", "pretrain256")
    assert [r.info.status for r in runs][:1] == ["FINISHED"] and len(runs) == 2
    from mlflow import MlflowClient

    loss_steps = [m.step for m in MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(
        runs[0].info.run_id, "loss")]
    assert loss_steps and min(loss_steps) > resumed, loss_steps
