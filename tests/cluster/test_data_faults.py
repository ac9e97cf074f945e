"""`stage=data` SIGKILLed midway (driver and its embedded Ray), then re-run with the same command: it completes, the
units finished before the kill and their shards are kept as they were (only the unfinished units run), the killed
run's temporary files are gone, and every input key ends in exactly one of manifest or rejects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cluster.helpers import (
    TINY_DATA,
    check_dataset,
    check_parts_readable,
    demo_keys,
    kill_tree,
    make_demo_source,
    run_stage,
    start_stage,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]
N_IMAGES = 40
PARTS_BEFORE_KILL = 3


def test_killed_data_stage_resumes_without_duplicates_or_loss(tmp_path):
    source = make_demo_source(tmp_path / "src", N_IMAGES)
    root = tmp_path / "root"
    # One image per work unit and two per tar: units finish all through the pass, so the kill lands between them.
    args = [*TINY_DATA, f"paths.root={root}", f"ingest.source={source}", "ingest.chunk_size=1",
            "buckets.samples_per_shard=2"]
    work_dir = root / "data" / "default" / "work"
    log = tmp_path / "data.log"

    proc = start_stage("data", args, log)
    try:
        wait_for(lambda: len(list(work_dir.glob("part-*.parquet"))) >= PARTS_BEFORE_KILL, 300,
                 f"{PARTS_BEFORE_KILL} finished units", interval_s=0.05, proc=proc, log_path=log)
    finally:
        kill_tree(proc)

    dataset = root / "data" / "default"
    assert not (dataset / "stats.json").exists(), "stage=data finished before the kill: the test proves nothing"
    before = {p.name: p.stat().st_mtime_ns for p in work_dir.glob("part-*.parquet")}
    tars_before = {p: p.stat().st_mtime_ns for p in (dataset / "shards").rglob("*.tar")}
    assert PARTS_BEFORE_KILL <= len(before) < N_IMAGES
    check_parts_readable(str(work_dir))  # what the kill left behind is complete parts only

    summary = run_stage("data", args, log).check()

    counts = check_dataset(str(dataset), demo_keys(Path(source)))
    assert summary["kept"] == counts["kept"] and summary["rejected"] == counts["rejected"]
    assert {n: (work_dir / n).stat().st_mtime_ns for n in before} == before, "finished units were redone"
    assert {p: p.stat().st_mtime_ns for p in tars_before} == tars_before, "a finished shard was rewritten"
    assert not list(dataset.rglob(".tmp-*")), "the killed run's open tars or work part were left behind"
    assert summary["units_run"] == N_IMAGES - len(before)
    stats = json.loads((dataset / "stats.json").read_text())
    assert stats["accounting"]["ok"] and stats["samples_in"] == N_IMAGES
    assert check_parts_readable(str(work_dir)) == 2 * N_IMAGES  # a part and a rejects file per unit
    # copies of samples in the killed run's unfinished tars are not counted
    assert sum(pq.read_table(dataset / "shard_index.parquet").column("samples").to_pylist()) == counts["kept"]
