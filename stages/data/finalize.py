"""After the streaming pass, on metadata only: global dedup, the manifest and rejects, the shard index, stats, plots.

1. Duplicates across units (stages/data/dedup.py).
2. *Publish*, one Ray task per group of units: their work parts minus the duplicates become
   `manifest.parquet/part-NNNNNN.parquet`; their rejects plus the duplicates `rejects.parquet/part-NNNNNN.parquet`;
   each unit is checked against its plan (every planned key in exactly one of the two); a fixed-size partial summary
   (stages/data/summary.py) and per-shard partial counts come back / go to `work/_index/`.
3. The shard index `shard_index.parquet/part-<bucket>.parquet`: per shard its bucket, the samples the manifest lists
   in it, its bytes and the bytes no manifest row points at (duplicates found after the pass, copies left by a
   killed run). The loader plans epochs from it without listing the shard objects.
4. `stats.json` and the plots, from the merged summaries.

Everything is keyed by units and parts, so the driver holds O(units) numbers, never a per-sample list.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from sdxl.buckets import parse_bucket_name
from stages.data import dedup, plan, records, runner, shards, summary

log = logging.getLogger(__name__)
INDEX_NAME = "shard_index.parquet"
PARTIALS_DIR = "_index"
PUBLISH_ROWS = 1_000_000  # samples per manifest part
LAYER_CHUNK = 1024  # manifest row group: the work unit of a metadata pass
INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("bucket_h", pa.int32()), ("bucket_w", pa.int32()),
                          ("samples", pa.int64()), ("bytes", pa.int64()), ("unreferenced_bytes", pa.int64())])
PARTIAL_SCHEMA = pa.schema([("shard", pa.string()), ("bucket_h", pa.int32()), ("bucket_w", pa.int32()),
                            ("samples", pa.int64()), ("referenced_bytes", pa.int64())])


def expected_keys(unit: dict[str, Any]) -> tuple[int | None, set[str] | None]:
    """(input count, input keys) a planned unit must account for; None where only reading the unit tells."""
    kind = unit["kind"]
    if kind == "folder":
        keys = {item["key"] for item in unit["items"]}
        return len(unit["items"]), keys
    if kind in ("urls", "url_rows", "parquet"):
        start, count = int(unit["start"]), int(unit["count"])
        return count, {f"{unit['prefix']}{i:09d}" for i in range(start, start + count)}
    return None, None


def unit_faults(unit: dict[str, Any], kept: list[str], rejected: list[str]) -> list[str]:
    """What breaks "every input of the unit in exactly one of manifest or rejects", in words."""
    faults = []
    both = set(kept) & set(rejected)
    seen = kept + rejected
    if both:
        faults.append(f"unit {unit['unit']}: kept and rejected: {sorted(both)[:3]}")
    if len(set(seen)) != len(seen):
        faults.append(f"unit {unit['unit']}: keys repeated ({len(seen) - len(set(seen))})")
    count, keys = expected_keys(unit)
    if keys is not None and keys != set(seen):
        faults.append(f"unit {unit['unit']}: lost {sorted(keys - set(seen))[:3]}, "
                      f"unknown {sorted(set(seen) - keys)[:3]}")
    elif count is not None and count != len(seen):
        faults.append(f"unit {unit['unit']}: {len(seen)} samples accounted for, {count} planned")
    return faults


def _plan_units(locations: list[tuple[int, str, int]]) -> dict[int, dict[str, Any]]:
    by_part: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for unit, part, group in locations:
        by_part[part].append((unit, group))
    out = {}
    for part, pairs in by_part.items():
        fs, path = storage.resolve(part)
        with fs.open_input_file(path) as f:
            rows = pq.ParquetFile(f).read_row_groups([g for _, g in pairs]).to_pylist()
        out.update({int(row["unit"]): row for row in rows})
    return out


def publish_group(job: tuple[int, list[tuple[int, str, int]]], work_dir: str, dataset_dir: str) -> dict[str, Any]:
    """Step 2 for one group of units (a Ray task); returns its partial summary."""
    index, locations = job
    units = [u for u, _, _ in locations]
    parts = [storage.join(work_dir, records.part_name(u)) for u in units]
    kept = records.read_tables(parts, records.WORK_SCHEMA)
    rejects = records.read_tables([storage.join(work_dir, records.part_name(u, "rejects")) for u in units],
                                  records.REJECT_SCHEMA)
    faults = _check_units(_plan_units(locations), kept, parts, work_dir)
    dups = dedup.read_for_units(work_dir, min(units), max(units))
    dups = dups.filter(pc.is_in(dups.column("unit"), pa.array(units, pa.int64())))
    if dups.num_rows:
        kept = kept.filter(pc.invert(pc.is_in(kept.column("key"), dups.column("key"))))
        rejects = pa.concat_tables([rejects, records.rejects_table(
            records.reject_row(k, "filter", "duplicate", f"same bytes as {w}")
            for k, w in zip(dups.column("key").to_pylist(), dups.column("winner").to_pylist()))])
    manifest = records.conform(kept, records.MANIFEST_SCHEMA).sort_by("key")
    rejects = rejects.sort_by("key")
    # Row groups of LAYER_CHUNK rows: a metadata pass reads and scores one row group per task.
    storage.write_bytes_atomic(storage.join(dataset_dir, records.MANIFEST_NAME, records.part_name(index)),
                               records.parquet_bytes(manifest, row_group_size=LAYER_CHUNK))
    storage.write_bytes_atomic(storage.join(dataset_dir, records.REJECTS_NAME, records.part_name(index)),
                               records.parquet_bytes(rejects))
    per_shard = manifest.group_by(["shard", "bucket_h", "bucket_w"]).aggregate(
        [("key", "count"), ("sample_size", "sum")]).rename_columns(
        ["shard", "bucket_h", "bucket_w", "samples", "referenced_bytes"])
    storage.write_bytes_atomic(storage.join(work_dir, PARTIALS_DIR, records.part_name(index, "shards")),
                               records.parquet_bytes(records.conform(per_shard, PARTIAL_SCHEMA)))
    part = summary.part_summary(manifest, rejects)
    part["faults"] = faults[:summary.MAX_EXAMPLES]
    part["nodes"] = _reader_nodes(parts)
    return part


def _check_units(planned: dict[int, dict], kept: pa.Table, parts: list[str], work_dir: str) -> list[str]:
    kept_by_unit: dict[int, list[str]] = defaultdict(list)
    for unit, key in zip(kept.column("unit").to_pylist(), kept.column("key").to_pylist()):
        kept_by_unit[int(unit)].append(key)
    faults = []
    for unit_id, unit in planned.items():
        rejected = records.read_tables([storage.join(work_dir, records.part_name(unit_id, "rejects"))],
                                       records.REJECT_SCHEMA, ["key"]).column("key").to_pylist()
        faults += unit_faults(unit, kept_by_unit.get(unit_id, []), rejected)
    return faults


def _reader_nodes(parts: list[str]) -> dict[str, int]:
    nodes: dict[str, int] = defaultdict(int)
    for uri in parts:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        nodes[(meta.get(b"reader_node") or b"").decode() or "unknown"] += 1
    return dict(nodes)


def index_buckets(buckets: list[str], dataset_dir: str, work_dir: str) -> dict[str, Any]:
    """Step 3 for some buckets (a Ray task): each bucket's index part; totals back."""
    partials = records.list_parts(storage.join(work_dir, PARTIALS_DIR), "shards-")
    totals = {"shards": 0, "bytes": 0, "unreferenced_bytes": 0, "per_bucket_shards": {}, "size_mb_hist": {}}
    for bucket in buckets:
        h, w = parse_bucket_name(bucket)
        counts = records.read_tables(partials, PARTIAL_SCHEMA, filters=[("bucket_h", "=", h), ("bucket_w", "=", w)])
        counts = counts.group_by("shard").aggregate([("samples", "sum"), ("referenced_bytes", "sum")])
        listed = {uri: size for uri, size in storage.list_sizes(storage.join(dataset_dir, shards.SHARDS_DIR, bucket),
                                                                ".tar")}
        known = dict(zip(counts.column("shard").to_pylist(), zip(counts.column("samples_sum").to_pylist(),
                                                                 counts.column("referenced_bytes_sum").to_pylist())))
        rows = []
        for uri, size in sorted(listed.items()):
            name = f"{shards.SHARDS_DIR}/{bucket}/{uri.replace(chr(92), '/').rsplit('/', 1)[-1]}"
            samples, referenced = known.get(name, (0, 0))
            rows.append({"shard": name, "bucket_h": h, "bucket_w": w, "samples": samples, "bytes": size,
                         "unreferenced_bytes": max(0, size - referenced - len(shards.END_OF_ARCHIVE))})
        missing = set(known) - {r["shard"] for r in rows}
        if missing:
            raise RuntimeError(f"the manifest names shards that do not exist: {sorted(missing)[:5]}")
        table = records.table_from_rows(rows, INDEX_SCHEMA)
        storage.write_bytes_atomic(storage.join(dataset_dir, INDEX_NAME, f"part-{bucket}.parquet"),
                                   records.parquet_bytes(table))
        totals["shards"] += len(rows)
        totals["bytes"] += sum(r["bytes"] for r in rows)
        totals["unreferenced_bytes"] += sum(r["unreferenced_bytes"] for r in rows)
        totals["per_bucket_shards"][bucket] = len(rows)
        for row in rows:  # shard sizes as a histogram of whole MB: fixed size, however many shards
            mb = row["bytes"] // 2**20
            totals["size_mb_hist"][mb] = totals["size_mb_hist"].get(mb, 0) + 1
    return totals


def _remove_stale(folder: str, keep: set[str]) -> None:
    for uri in storage.list_files(folder, suffix=".parquet"):
        if uri not in keep:
            storage.remove(uri)


def publish(dataset_dir: str, chunk_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Steps 1-3: (merged summary, shard totals)."""
    import ray

    work_dir, plan_dir = storage.join(dataset_dir, shards.WORK_DIR), storage.join(dataset_dir, plan.PLAN_DIR)
    info = plan.load_info(plan_dir)
    locations = list(plan.unit_index(plan_dir))
    parts = records.list_parts(work_dir)
    if len(parts) != len(locations):
        raise RuntimeError(f"{work_dir}: {len(parts)} of {len(locations)} units are done; run stage=data to finish")
    dedup.find_all(work_dir, parts, int(info.get("planned_inputs") or len(parts) * chunk_size))
    per_group = max(1, PUBLISH_ROWS // max(1, chunk_size))
    jobs = list(enumerate(runner.batches(locations, per_group)))
    total: dict[str, Any] = {}
    remote = ray.remote(num_cpus=1)(publish_group) if len(jobs) > 1 and ray.is_initialized() else None
    if remote is None:
        for job in jobs:
            summary.merge(total, publish_group(job, work_dir, dataset_dir))
    else:  # merge as results come in: the driver holds one partial summary at a time
        pending = [remote.remote(job, work_dir, dataset_dir) for job in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            summary.merge(total, ray.get(done[0]))
    for name in (records.MANIFEST_NAME, records.REJECTS_NAME):
        _remove_stale(storage.join(dataset_dir, name),
                      {storage.join(dataset_dir, name, records.part_name(i)) for i, _ in jobs})
    # Every bucket folder, also one whose shards hold only unreferenced copies: the index accounts for all bytes.
    buckets = sorted(set(total.get("buckets", {})) | set(storage.list_entries(
        storage.join(dataset_dir, shards.SHARDS_DIR))[1]))
    _remove_stale(storage.join(dataset_dir, INDEX_NAME),
                  {storage.join(dataset_dir, INDEX_NAME, f"part-{b}.parquet") for b in buckets})
    shard_totals: dict[str, Any] = {"shards": 0, "bytes": 0, "unreferenced_bytes": 0, "per_bucket_shards": {},
                                    "size_mb_hist": {}}
    for part in runner.map_tasks(index_buckets, runner.batches(buckets, 8), dataset_dir, work_dir):
        for key in ("shards", "bytes", "unreferenced_bytes"):
            shard_totals[key] += part[key]
        shard_totals["per_bucket_shards"].update(part["per_bucket_shards"])
        for mb, n in part["size_mb_hist"].items():
            shard_totals["size_mb_hist"][mb] = shard_totals["size_mb_hist"].get(mb, 0) + n
    return total, shard_totals


def size_quantiles(hist: dict[Any, int]) -> dict[str, int]:
    """Median, 10th percentile and largest shard size in whole MB, from the size histogram."""
    counts = sorted((int(mb), n) for mb, n in hist.items())
    total = sum(n for _, n in counts)
    if not total:
        return {"p10": 0, "median": 0, "max": 0}

    def quantile(q: float) -> int:
        seen = 0
        for mb, n in counts:
            seen += n
            if seen >= q * total:
                return mb
        return counts[-1][0]

    return {"p10": quantile(0.1), "median": quantile(0.5), "max": counts[-1][0]}
