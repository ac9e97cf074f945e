"""`stage=data` SIGKILLed midway (driver and its embedded Ray), then re-run with the same command: it completes, the
parts finished before the kill are kept as they were, and every input key ends in exactly one of manifest or rejects.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    # One image per ingest chunk: many small parts, so the kill lands between parts.
    args = [*TINY_DATA, f"paths.root={root}", f"ingest.source={source}", "ingest.chunk_size=1"]
    ingest_dir = root / "data" / "default" / "ingest"
    log = tmp_path / "data.log"

    proc = start_stage("data", args, log)
    try:
        wait_for(lambda: len(list(ingest_dir.glob("part-*.parquet"))) >= PARTS_BEFORE_KILL, 300,
                 f"{PARTS_BEFORE_KILL} ingest parts", interval_s=0.05, proc=proc, log_path=log)
    finally:
        kill_tree(proc)

    dataset = root / "data" / "default"
    assert not (dataset / "manifest.parquet").exists(), "stage=data finished before the kill: the test proves nothing"
    before = {p.name: p.stat().st_mtime_ns for p in ingest_dir.glob("part-*.parquet")}
    assert PARTS_BEFORE_KILL <= len(before)
    check_parts_readable(str(ingest_dir))  # what the kill left behind is complete parts only

    summary = run_stage("data", args, log).check()

    counts = check_dataset(str(dataset), demo_keys(Path(source)))
    assert summary["kept"] == counts["kept"] and summary["rejected"] == counts["rejected"]
    assert {n: (ingest_dir / n).stat().st_mtime_ns for n in before} == before, "finished parts were redone"
    ingest_done = json.loads((ingest_dir / "_SUCCESS").read_text())
    assert ingest_done["kept"] + ingest_done["rejected"] == N_IMAGES
    for stage in ("ingest", "filter", "caption"):
        check_parts_readable(str(dataset / stage))
