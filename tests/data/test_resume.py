"""Resume: the streaming pass killed with SIGKILL mid-run, re-run, redoes only the unfinished units."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.context import StageContext
from stages.data import pipeline as data_pipeline
from stages.data import records
from tests.data import data_cfg

pytestmark = [pytest.mark.integration, pytest.mark.slow]
N_IMAGES = 240
REPO = Path(__file__).resolve().parents[2]


def _write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
        (folder / f"img{i:04d}.png").write_bytes(buf.getvalue())
        (folder / f"img{i:04d}.txt").write_text(f"image {i}")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the stage process and everything it started (its embedded Ray), by pid."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    os.kill(proc.pid, signal.SIGKILL)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def test_killed_data_pass_resumes_without_duplicates_or_loss(ray_local, tmp_path):
    source, root = tmp_path / "src", tmp_path / "root"
    _write_images(source, N_IMAGES)
    # Units of 2 and tars of 4: units finish (their tars close) all through the run, so the kill lands mid-pass.
    overrides = {"ingest.source": str(source), "ingest.chunk_size": 2, "buckets.samples_per_shard": 4}
    script = textwrap.dedent(f"""
        import ray
        from pipeline.context import StageContext
        from stages.data import pipeline
        from tests.data import data_cfg
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        pipeline.run(data_cfg(**{overrides!r}), StageContext(root={str(root)!r}, stage="data"))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = StageContext(root=str(root), stage="data")
    work = Path(ctx.dataset_dir) / "work"
    deadline = time.time() + 300
    try:
        while len(list(work.glob("part-*.parquet"))) < 5:
            assert proc.poll() is None, "the stage ended before it could be killed"
            assert time.time() < deadline, "no units finished in time"
            time.sleep(0.02)
    finally:
        _kill_tree(proc)

    assert not (Path(ctx.dataset_dir) / "stats.json").exists(), "the stage finished before the kill: proves nothing"
    done_before = {p.name: p.stat().st_mtime_ns for p in work.glob("part-*.parquet")}
    tars_before = {p: p.stat().st_mtime_ns for p in (Path(ctx.dataset_dir) / "shards").rglob("*.tar")}
    assert 5 <= len(done_before) < N_IMAGES // 2

    result = data_pipeline.run(data_cfg(**overrides), ctx)

    assert result["units_run"] == N_IMAGES // 2 - len(done_before)
    assert {n: (work / n).stat().st_mtime_ns for n in done_before} == done_before  # finished units untouched
    assert {p: p.stat().st_mtime_ns for p in tars_before} == tars_before  # and no shard rewritten
    assert not list(Path(ctx.dataset_dir).rglob(".tmp-*"))  # the killed run's open tars and work part are gone
    keys = records.read_dataset(str(Path(ctx.dataset_dir) / "manifest.parquet"), records.MANIFEST_SCHEMA,
                                ["key"]).column("key").to_pylist()
    assert sorted(keys) == [f"img{i:04d}" for i in range(N_IMAGES)]  # no duplicates, nothing lost
    stats = json.loads((Path(ctx.dataset_dir) / "stats.json").read_text())
    assert stats["accounting"]["ok"] and stats["samples_kept"] == N_IMAGES
    index = pq.read_table(Path(ctx.dataset_dir) / "shard_index.parquet")
    assert sum(index.column("samples").to_pylist()) == N_IMAGES  # copies in the killed run's tars are not counted


def test_a_killed_runs_temp_files_are_removed_and_nothing_else(tmp_path):
    """Whether the kill above lands in a write is up to timing; the clean-up it relies on is checked here."""
    from stages.data.stream import _remove_stale_temp_files

    work, bucket = tmp_path / "work", tmp_path / "shards" / "64x64"
    for folder in (work, bucket):
        folder.mkdir(parents=True)
    kept = [work / "part-000001.parquet", bucket / "64x64-00000.tar"]
    stale = [work / ".tmp-part-000005.parquet-4r_wqihx", bucket / ".tmp-64x64-00001.tar-x1"]
    for path in kept + stale:
        path.write_bytes(b"x")
    _remove_stale_temp_files(str(work))
    _remove_stale_temp_files(str(tmp_path / "shards"))
    assert [p for p in kept + stale if p.exists()] == kept
