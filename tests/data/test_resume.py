"""Resume: a stage killed with SIGKILL mid-run, re-run, redoes only the unfinished chunks."""

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
import pytest
from PIL import Image

from pipeline.context import StageContext
from stages.data import ingest, records
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


def test_killed_ingest_resumes_without_duplicates_or_loss(ray_local, tmp_path):
    source, root = tmp_path / "src", tmp_path / "root"
    _write_images(source, N_IMAGES)
    overrides = {"ingest.source": str(source), "ingest.chunk_size": 1}
    script = textwrap.dedent(f"""
        import ray
        from pipeline.context import StageContext
        from stages.data import ingest
        from tests.data import data_cfg
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        ingest.run(data_cfg(**{overrides!r}), StageContext(root={str(root)!r}, stage="ingest"))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = StageContext(root=str(root), stage="ingest")
    stage_dir = Path(ctx.stage_dir("ingest"))
    deadline = time.time() + 240
    try:
        while len(list(stage_dir.glob("part-*.parquet"))) < 5:
            assert proc.poll() is None, "the stage ended before it could be killed"
            assert time.time() < deadline, "no parts appeared in time"
            time.sleep(0.02)
    finally:
        _kill_tree(proc)

    assert not (stage_dir / "_SUCCESS").exists(), "the stage finished before the kill; the test proves nothing"
    done_before = {p.name: p.stat().st_mtime_ns for p in stage_dir.glob("part-*.parquet")}
    assert 5 <= len(done_before) < N_IMAGES

    counts = ingest.run(data_cfg(**overrides), ctx)

    assert counts["chunks_run"] == N_IMAGES - len(done_before)
    assert {n: (stage_dir / n).stat().st_mtime_ns for n in done_before} == done_before  # finished parts untouched
    keys = records.read_tables(records.list_parts(str(stage_dir)), records.INGEST_SCHEMA, ["key"]).column("key")
    keys = keys.to_pylist()
    assert len(keys) == len(set(keys)) == N_IMAGES  # no duplicates, nothing lost
    assert keys == [f"img{i:04d}" for i in range(N_IMAGES)]
    assert json.loads((stage_dir / "_SUCCESS").read_text())["kept"] == N_IMAGES
