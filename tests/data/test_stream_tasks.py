"""The streaming pass without model stages: plain Ray reader tasks from a bounded window (stages/data/stream.py).
Its outputs (shards, manifest, rejects, resume) are checked end to end in test_data_stage.py and tests/cluster."""

from __future__ import annotations

import pytest

from stages.data.runner import Resources
from stages.data.stream import _task_window


@pytest.mark.parametrize("concurrency, num_cpus, cluster_cpus, pending, window", [
    (None, 1.0, 16, 1000, 32),  # unbounded: twice what the cluster runs at once
    (None, 2.0, 16, 1000, 16),  # each task reserves 2 CPUs
    (None, 1.0, 16, 5, 5),  # never more than what is pending
    (3, 1.0, 16, 1000, 3),  # the configured concurrency wins
    (None, 1.0, 0.5, 10, 2),  # a cluster with less than a CPU still runs one task at a time, queued
])
def test_task_window(concurrency, num_cpus, cluster_cpus, pending, window):
    assert _task_window(Resources(concurrency=concurrency, num_cpus=num_cpus), cluster_cpus, pending) == window


def test_a_failing_unit_fails_the_pass_with_its_error(ray_local, tmp_path):
    """A reader task that raises (here: its plan part is gone) ends the pass with that error, not a silent drop."""
    from stages.data import download, process
    from stages.data.stream import ReadOptions, _run_reader_tasks

    opts = ReadOptions(process.SampleOptions(), download.DownloadOptions())
    missing = str(tmp_path / "plan" / "part-000000.parquet")
    with pytest.raises(Exception, match="part-000000.parquet"):
        _run_reader_tasks([{"unit": 0, "part": missing, "group": 0}], opts, str(tmp_path / "work"), [],
                          Resources(concurrency=None), progress_interval_s=30)
