"""Stage `buckets`: aspect buckets, bucketed WebDataset shards, manifest, rejects, stats and plots.

Each sample goes to the App. I bucket (scaled to `buckets.resolution`, sides multiples of `buckets.multiple`) nearest
to its EXIF-corrected aspect ratio; `orig_h/orig_w` are kept for size conditioning. Images are only re-encoded when
their longer side exceeds `buckets.max_side` (downscaled) or their format is not jpg/png/webp (stored as PNG).
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig

from pipeline import storage
from pipeline.context import StageContext
from sdxl.buckets import bucket_name, bucket_table, nearest_bucket
from stages.data import records, runner, shards, sources

log = logging.getLogger(__name__)
STAGE = "buckets"
DATA_STAGES = ("ingest", "filter", "caption", "buckets")
SMALL_SIDE = 256


# --------------------------------------------------------------------------------------------- pure core
def reencode(data: bytes, fmt: str | None, max_side: int | None, jpeg_quality: int) -> tuple[bytes, str]:
    """Upright RGB re-encoding, shrunk to ``max_side`` when given: JPEG stays JPEG, anything else becomes PNG."""
    image = sources.decode_rgb(data, max_side)
    out_format = "JPEG" if fmt in ("JPEG", "MPO") else "PNG"
    buf = io.BytesIO()
    image.save(buf, format=out_format, **({"quality": jpeg_quality} if out_format == "JPEG" else {}))
    return buf.getvalue(), out_format


def assign_table(table: pa.Table, resolution: int, multiple: int, max_side: int | None = None,
                 jpeg_quality: int = 95) -> tuple[pa.Table, pa.Table]:
    """(rows in the bucket schema, rejects) for one caption part."""
    buckets = bucket_table(resolution, multiple)
    rows, rejects = [], []
    for row in table.to_pylist():
        h, w = row["orig_h"], row["orig_w"]
        if not h or not w:
            rejects.append(records.reject_row(row["key"], STAGE, "missing_size", f"orig_h={h}, orig_w={w}"))
            continue
        row["bucket_h"], row["bucket_w"] = nearest_bucket(h, w, buckets)
        too_big = max_side is not None and max(h, w) > max_side
        if too_big or row["format"] not in shards.EXTENSIONS:
            try:
                row["image"], new_format = reencode(row["image"], row["format"], max_side if too_big else None,
                                                    jpeg_quality)
            except Exception as err:  # the filter decoded it, so this is rare: record it, do not crash
                rejects.append(records.reject_row(row["key"], STAGE, "reencode_failed", f"{type(err).__name__}: {err}"))
                continue
            meta = records.load_meta(row["meta_json"])
            meta["reencoded"] = {"from_format": row["format"], "to_format": new_format, "downscaled": too_big}
            row["format"], row["meta_json"] = new_format, records.dump_meta(meta)
        rows.append(row)
    return records.table_from_rows(rows, records.BUCKET_SCHEMA), records.rejects_table(rejects)


def small_share(orig_h: list[int], orig_w: list[int], threshold: int = SMALL_SIDE) -> float:
    """Share of images whose shorter side is below ``threshold`` (the paper: 39% under 256 px)."""
    if not orig_h:
        return 0.0
    return sum(1 for h, w in zip(orig_h, orig_w) if min(h, w) < threshold) / len(orig_h)


def accounting(input_keys: list[str], kept_keys: list[str], rejected_keys: list[str]) -> dict[str, Any]:
    """Every input key in exactly one of the manifest or the rejects."""
    inputs, kept, rejected = Counter(input_keys), Counter(kept_keys), Counter(rejected_keys)
    both = set(kept) & set(rejected)
    repeated = [k for k, n in (kept + rejected).items() if n > 1]
    lost = set(inputs) - set(kept) - set(rejected)
    unknown = (set(kept) | set(rejected)) - set(inputs)
    return {"inputs": len(input_keys), "manifest": len(kept_keys), "rejects": len(rejected_keys),
            "ok": not (both or repeated or lost or unknown) and len(inputs) == len(input_keys),
            "lost": sorted(lost)[:20], "repeated": sorted(repeated)[:20], "unknown": sorted(unknown)[:20]}


# --------------------------------------------------------------------------------------------- Ray wrapper
class BucketWorker(runner.ChunkWorker):
    """Writes each part with one row group per bucket, so a shard writer reads only its bucket's rows."""

    def run_chunk(self, chunk: dict[str, Any]) -> tuple[int, int]:
        index = int(chunk["index"])
        kept, rejects = assign_table(storage.read_parquet(chunk["input"]), **self.options)
        storage.write_parquet_atomic(rejects, storage.join(self.stage_dir, records.rejects_name(index)))
        records.write_grouped_parquet_atomic(kept, storage.join(self.stage_dir, records.part_name(index)),
                                             ["bucket_h", "bucket_w"])
        return kept.num_rows, rejects.num_rows


INDEX_SCHEMA = pa.schema([("key", pa.string()), ("bucket_h", pa.int32()), ("bucket_w", pa.int32()),
                          ("row_group", pa.int32()), ("part", pa.string())])


def _index_table(stage_dir: str) -> pa.Table:
    """(key, bucket, row group, part) of every kept sample, read from the parts without image bytes."""
    tables = []
    for uri in records.list_parts(stage_dir):
        t = records.row_group_index(uri, ["key", "bucket_h", "bucket_w"])
        if t.num_rows:
            tables.append(records.conform(t.append_column("part", pa.array([uri] * t.num_rows, pa.string())),
                                          INDEX_SCHEMA))
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def write_shards(dataset_dir: str, stage_dir: str, samples_per_shard: int,
                 resources: runner.Resources) -> list[dict[str, Any]]:
    shards_dir = runner.absolute(storage.join(dataset_dir, shards.SHARDS_DIR))
    storage.makedirs(shards_dir)
    plan = runner.load_or_make_plan(shards_dir, lambda: shards.plan_shards(_index_table(stage_dir),
                                                                            samples_per_shard))
    runner.run_chunks(shards_dir, plan, shards.ShardWorker, {}, resources)
    storage.write_json_atomic(storage.join(shards_dir, records.SUCCESS_NAME),
                              {"shards": len(plan), "samples": sum(len(c["members"]) for c in plan)})
    return plan


def _plot(ctx: StageContext, name: str, draw) -> Any:
    """Draw into a local file, store it in the dataset folder and log it as an MLflow artifact."""
    local = os.path.join(ctx.scratch_dir(), name)
    result = draw(local)
    with open(local, "rb") as f:
        storage.write_bytes_atomic(storage.join(ctx.dataset_dir, name), f.read())
    ctx.log_artifact(local, "data")
    return result


def finalize(ctx: StageContext, plan: list[dict[str, Any]]) -> dict[str, Any]:
    """manifest.parquet, rejects.parquet, stats.json and the two plots."""
    from stages.data import plots

    stage_dir = runner.absolute(ctx.stage_dir(STAGE))
    columns = [f.name for f in records.BUCKET_SCHEMA if f.name != "image"]
    samples = records.read_tables(records.list_parts(stage_dir), records.BUCKET_SCHEMA, columns)
    manifest = shards.manifest_table(samples, plan)
    storage.write_parquet_atomic(manifest, storage.join(ctx.dataset_dir, "manifest.parquet"))

    rejects = pa.concat_tables([records.read_rejects(runner.absolute(ctx.stage_dir(s))) for s in DATA_STAGES]).sort_by("key")
    storage.write_parquet_atomic(rejects, storage.join(ctx.dataset_dir, "rejects.parquet"))

    ingest_dir = runner.absolute(ctx.stage_dir("ingest"))
    input_keys = (records.read_tables(records.list_parts(ingest_dir), records.INGEST_SCHEMA, ["key"])
                  .column("key").to_pylist() + records.read_rejects(ingest_dir).column("key").to_pylist())
    audit = accounting(input_keys, manifest.column("key").to_pylist(), rejects.column("key").to_pylist())

    orig_h, orig_w = manifest.column("orig_h").to_pylist(), manifest.column("orig_w").to_pylist()
    per_bucket = Counter(bucket_name((h, w)) for h, w in zip(manifest.column("bucket_h").to_pylist(),
                                                              manifest.column("bucket_w").to_pylist()))
    per_bucket_sorted = dict(sorted(per_bucket.items()))
    size_summary = _plot(ctx, "size_heatmap.png",
                         lambda p: plots.plot_size_heatmap(orig_h, orig_w, p, threshold=SMALL_SIDE))
    _plot(ctx, "bucket_histogram.png", lambda p: plots.plot_bucket_histogram(per_bucket_sorted, p))
    reasons = dict(sorted(Counter(rejects.column("reason").to_pylist()).items()))
    _plot(ctx, "reject_reasons.png", lambda p: plots.plot_reject_reasons(reasons, p))

    stats = {
        "stages": {s: {k: v for k, v in runner.require_success(runner.absolute(ctx.stage_dir(s)), s).items()
                       if k in ("kept", "rejected", "rejects_by_reason", "chunks")} for s in DATA_STAGES},
        "samples_in": audit["inputs"], "samples_kept": manifest.num_rows, "samples_rejected": rejects.num_rows,
        "rejects_by_reason": reasons,
        "rejects_by_stage": dict(sorted(Counter(rejects.column("stage").to_pylist()).items())),
        "buckets": per_bucket_sorted,
        "shards": dict(sorted(Counter(c["bucket"] for c in plan).items())),
        "num_shards": len(plan),
        f"share_smaller_than_{SMALL_SIDE}": small_share(orig_h, orig_w),
        "size_summary": size_summary,
        "accounting": audit,
    }
    storage.write_json_atomic(storage.join(ctx.dataset_dir, "stats.json"), stats)
    if not audit["ok"]:
        raise RuntimeError(f"data accounting broken (every input must be in manifest or rejects once): {audit}")
    return stats


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    bcfg = cfg.buckets
    caption_dir, stage_dir = runner.absolute(ctx.stage_dir("caption")), runner.absolute(ctx.stage_dir(STAGE))
    runner.require_success(caption_dir, "caption")
    resolution, multiple = int(bcfg.resolution), int(bcfg.multiple)
    bucket_table(resolution, multiple)  # a bad resolution/multiple fails here, named
    max_side = bcfg.get("max_side")
    if max_side is not None and int(max_side) < 1:
        raise ValueError(f"buckets.max_side must be null or >= 1, got {max_side}")
    options = {"resolution": resolution, "multiple": multiple,
               "max_side": int(max_side) if max_side is not None else None,
               "jpeg_quality": int(bcfg.get("jpeg_quality", 95))}
    resources = runner.Resources.from_config(bcfg)
    counts = runner.run_stage(STAGE, stage_dir, runner.previous_parts_plan(caption_dir), BucketWorker, options,
                              resources, {"resolution": resolution, "multiple": multiple})
    plan = write_shards(runner.absolute(ctx.dataset_dir), stage_dir, int(bcfg.samples_per_shard), resources)
    stats = finalize(ctx, plan)
    metrics = {"data/samples_in": stats["samples_in"], "data/samples_kept": stats["samples_kept"],
               "data/samples_rejected": stats["samples_rejected"], "data/num_shards": stats["num_shards"],
               f"data/share_smaller_than_{SMALL_SIDE}": stats[f"share_smaller_than_{SMALL_SIDE}"]}
    metrics.update({f"data/rejects/{r}": n for r, n in stats["rejects_by_reason"].items()})
    metrics.update({f"data/bucket/{b}": n for b, n in stats["buckets"].items()})
    ctx.log_metrics(metrics)
    ctx.log_dict(stats, "data/stats.json")
    log.info("buckets: %d kept in %d shards, %d rejected", stats["samples_kept"], stats["num_shards"],
             stats["samples_rejected"])
    return {"kept": stats["samples_kept"], "rejected": stats["samples_rejected"], "num_shards": stats["num_shards"],
            "buckets": stats["buckets"], "dataset_dir": ctx.dataset_dir, "stage_counts": counts}
