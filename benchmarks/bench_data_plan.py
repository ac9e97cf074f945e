"""Driver memory at scale: planning 10⁷ samples and finishing a dataset of 10⁷ on metadata, in a measured process.

- `urls`: a 10⁷-row parquet URL list (made beforehand in another process) planned into work units;
- `folder`: a folder listing of 10⁷ images in 10⁴ folders, served by a synthetic lister (no files on disk), planned
  through the same streaming planner (one folder listing at a time);
- `finalize`: the metadata steps after the streaming pass — dedup across units, manifest and rejects parts, shard
  index, stats and plots — over 10⁷ synthetic work-part rows (made beforehand), on an embedded Ray.
Each reports the measuring process's peak RSS (goal < 1 GB) and its wall time.

    python benchmarks/bench_data_plan.py                       # 10⁷ rows (several minutes for `finalize`)
    BENCH_PLAN_ROWS=100000 python benchmarks/bench_data_plan.py  # a quick check
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks.bench_data_tools import PYTHON, QUIET_ENV, TreeMeter, run_measured  # noqa: E402

GOAL_MB = 1024
UNIT = 10_000  # samples per work unit at this scale (the full preset's order of magnitude)
ABOUT = ("Driver memory at scale, each in a fresh process: planning a 10⁷-row parquet URL list; planning a listing of "
         "10⁷ images in 10⁴ folders (a synthetic lister through the streaming planner); and the metadata steps "
         "after the streaming pass (dedup, manifest and rejects parts, shard index, stats, plots) over 10⁷ synthetic "
         f"work-part rows on an embedded Ray. Units of {UNIT} samples. Goal: driver peak RSS < 1 GB.")


def _make_url_list(path: str, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("url", pa.string()), ("caption", pa.string())])) as writer:
        for start in range(0, rows, 1_000_000):
            ids = range(start, min(rows, start + 1_000_000))
            writer.write_table(pa.table({"url": [f"http://127.0.0.1/img/{i}.jpg" for i in ids],
                                         "caption": [f"picture {i}" for i in ids]}), row_group_size=100_000)


def _make_work(dataset_dir: str, rows: int) -> None:
    """A finished streaming pass of ``rows`` samples: plan units of kind parquet, work parts, empty rejects, and the
    shard files they point at (empty tars: the metadata steps only list them)."""
    import pyarrow as pa

    from pipeline import storage
    from stages.data import plan, records, shards

    writer = plan.PlanWriter(os.path.join(dataset_dir, plan.PLAN_DIR))
    work = os.path.join(dataset_dir, shards.WORK_DIR)
    os.makedirs(os.path.join(dataset_dir, "shards", "1024x1024"), exist_ok=True)
    for unit, start in enumerate(range(0, rows, UNIT)):
        n = min(UNIT, rows - start)
        writer.add("parquet", "/synthetic.parquet", "", [0], start, 0, n)
        shard = f"shards/1024x1024/1024x1024-{unit // 100:05d}.tar"
        keys = [f"{i:09d}" for i in range(start, start + n)]
        table = pa.table({"key": keys, "unit": pa.array([unit] * n, pa.int64()),
                          "sha256": [f"{i % (rows - rows // 100):064x}" for i in range(start, start + n)],  # 1% dups
                          "shard": [shard] * n, "member_key": keys, "image_offset": pa.array([512] * n, pa.int64()),
                          "image_size": pa.array([80_000] * n, pa.int64()), "sample_size": pa.array([81_920] * n),
                          "bucket_h": pa.array([1024] * n, pa.int32()), "bucket_w": pa.array([1024] * n, pa.int32()),
                          "orig_h": pa.array([(i % 1000) + 100 for i in range(n)], pa.int32()),
                          "orig_w": pa.array([(i % 700) + 100 for i in range(n)], pa.int32()),
                          "caption": [f"picture {i}" for i in range(start, start + n)], "caption_synthetic": [""] * n})
        storage.write_bytes_atomic(os.path.join(work, records.part_name(unit, "rejects")),
                                   records.parquet_bytes(records.rejects_table([])))
        storage.write_bytes_atomic(os.path.join(work, records.part_name(unit)),
                                   records.parquet_bytes(records.conform(table, records.WORK_SCHEMA)))
        if unit % 100 == 0:
            open(os.path.join(dataset_dir, shard), "wb").close()
    writer.close({"source": "/synthetic.parquet", "source_kind": "parquet", "chunk_size": UNIT,
                  "counts_known": True})


def measured_plan(kind: str, workdir: str, rows: int) -> dict[str, Any]:
    with TreeMeter() as meter:
        from omegaconf import OmegaConf

        from stages.data import plan, sources

        if kind == "urls":
            writer = plan.PlanWriter(os.path.join(workdir, "plan_urls"))
            extra = plan.plan_urls(writer, os.path.join(workdir, "urls.parquet"), UNIT, "url", "caption")
            info = writer.close(extra)
        elif kind == "folder":
            folders = max(1, rows // 1000)

            def lister(uri: str):
                rel = uri[len(os.path.join(workdir, "photos")):].strip("/")
                if not rel:
                    return [], [f"{i:05d}" for i in range(folders)]
                return [(f"{j:04d}.jpg", 80_000) for j in range(rows // folders)], []

            writer = plan.PlanWriter(os.path.join(workdir, "plan_folder"))
            info = writer.close(plan.plan_folder(writer, os.path.join(workdir, "photos"), UNIT,
                                                 sources.IMAGE_EXTENSIONS, lister))
        else:
            import ray

            from pipeline.context import StageContext
            from stages.data import buckets

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            ctx = StageContext(root=workdir, stage="buckets", dataset="synthetic")
            stats = buckets.finalize_dataset(OmegaConf.create({}), ctx, force=True)
            info = {"planned_inputs": stats["samples_in"], "units": stats["units"],
                    "duplicates": stats["rejects_by_reason"].get("duplicate", 0)}
            ray.shutdown()
    return {**meter.report(), "rows": rows, "units": info["units"], "planned_inputs": info["planned_inputs"],
            **({"duplicates": info["duplicates"]} if "duplicates" in info else {})}


def main(rows: int | None = None) -> dict:
    rows = rows or int(os.environ.get("BENCH_PLAN_ROWS", "10000000"))
    results: dict[str, Any] = {"about": ABOUT, "rows": rows, "unit": UNIT}
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        code = (f"import sys; sys.path.insert(0, {_REPO!r}); from benchmarks import bench_data_plan as b; "
                f"b._make_url_list({os.path.join(tmp, 'urls.parquet')!r}, {rows}); "
                f"b._make_work({os.path.join(tmp, 'data', 'synthetic')!r}, {rows})")
        subprocess.run([PYTHON, "-c", code], check=True, env={**os.environ, **QUIET_ENV})
        for kind in ("urls", "folder", "finalize"):
            report = run_measured(["plan", kind, tmp, str(rows)])
            results[f"{kind}_driver_peak_rss_mb"] = report["driver_peak_rss_mb"]
            results[f"{kind}_wall_s"] = report["wall_s"]
            results[f"{kind}_planned_inputs"] = report["planned_inputs"]
            if "duplicates" in report:
                results["finalize_duplicates_found"] = report["duplicates"]
    results["goal_mb"] = GOAL_MB
    results["meets_goal"] = all(results[f"{k}_driver_peak_rss_mb"] < GOAL_MB for k in ("urls", "folder", "finalize"))
    return results


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
