"""WebDataset shards grouped by bucket: planning, tar writing and the manifest rows.

Plan: the kept samples, grouped by bucket and sorted by key, are cut into shards of `buckets.samples_per_shard`;
shard i of bucket HxW is `shards/HxW/HxW-0000i.tar`. The plan depends only on the keys and buckets, so a re-run
produces the same shards, and a shard that exists is not written again. Tars are byte-deterministic (fixed mtime,
owner and mode).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from typing import Any

import pyarrow as pa

from pipeline import storage
from stages.data import records, runner
from sdxl.buckets import bucket_name

SHARDS_DIR = "shards"
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


def member_keys(keys: list[str]) -> dict[str, str]:
    """WebDataset-safe member names (`.` and `/` → `_`), made unique over the dataset in key order."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for key in sorted(keys):
        base = key.replace("/", "_").replace(".", "_").replace("\\", "_")
        name, n = base, 1
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        out[key] = name
    return out


def plan_shards(index: pa.Table, samples_per_shard: int) -> list[dict[str, Any]]:
    """Shard chunks from a table of (key, bucket_h, bucket_w, part) over every kept sample."""
    if samples_per_shard < 1:
        raise ValueError(f"buckets.samples_per_shard must be >= 1, got {samples_per_shard}")
    names = member_keys(index.column("key").to_pylist())
    by_bucket: dict[tuple[int, int], list[tuple[str, str, int]]] = defaultdict(list)
    columns = ("key", "bucket_h", "bucket_w", "part", "row_group")
    for key, h, w, part, group in zip(*(index.column(c).to_pylist() for c in columns)):
        by_bucket[(h, w)].append((key, part, group))
    plan: list[dict[str, Any]] = []
    for bucket in sorted(by_bucket):
        name = bucket_name(bucket)
        members = sorted(by_bucket[bucket])
        for shard_i, start in enumerate(range(0, len(members), samples_per_shard)):
            chunk = members[start:start + samples_per_shard]
            plan.append({"index": len(plan), "bucket": name, "output": f"{name}/{name}-{shard_i:05d}.tar",
                         "members": [{"key": k, "member_key": names[k], "part": p, "row_group": g}
                                     for k, p, g in chunk]})
    return plan


def sample_json(row: dict[str, Any]) -> dict[str, Any]:
    """The `<key>.json` member: what training needs besides the pixels."""
    return {
        "key": row["key"], "caption": row["caption"], "caption_synthetic": row["caption_synthetic"],
        "orig_h": row["orig_h"], "orig_w": row["orig_w"], "bucket_h": row["bucket_h"], "bucket_w": row["bucket_w"],
        "format": row["format"], "sha256": row["sha256"],
        "scores": {name: row[name] for name in records.SCORE_COLUMNS},
        "meta": records.load_meta(row["meta_json"]),
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(rows: list[dict[str, Any]], names: list[str]) -> bytes:
    """A WebDataset tar: `<name>.<ext>` (image bytes as they are) and `<name>.json` per sample, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row, name in zip(rows, names):
            ext = EXTENSIONS.get(row["format"])
            if ext is None:
                raise ValueError(f"sample {row['key']!r} has format {row['format']!r}; buckets stage re-encodes "
                                 f"formats other than {sorted(EXTENSIONS)}")
            _add_member(tar, f"{name}.{ext}", row["image"])
            _add_member(tar, f"{name}.json",
                        json.dumps(sample_json(row), sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return buf.getvalue()


class ShardWorker(runner.ChunkWorker):
    """Writes one planned shard (atomically), reading only the row groups (one bucket of one part) it needs."""

    def run_chunk(self, chunk: dict[str, Any]) -> tuple[int, int]:
        members = chunk["members"]
        groups: dict[str, set[int]] = defaultdict(set)
        for m in members:
            groups[m["part"]].add(int(m["row_group"]))
        wanted = {m["key"] for m in members}
        rows: dict[str, dict[str, Any]] = {}
        for part, row_groups in groups.items():
            for row in records.read_row_groups(part, sorted(row_groups)).to_pylist():
                if row["key"] in wanted:
                    rows[row["key"]] = row
        missing = [k for k in wanted if k not in rows]
        if missing:
            raise RuntimeError(f"shard {chunk['output']}: keys {sorted(missing)[:5]} are missing from their parts")
        data = tar_bytes([rows[m["key"]] for m in members], [m["member_key"] for m in members])
        storage.write_bytes_atomic(runner.chunk_output(self.stage_dir, chunk), data)
        return len(members), 0


def manifest_table(samples: pa.Table, plan: list[dict[str, Any]]) -> pa.Table:
    """Manifest rows (no image bytes), sorted by key, from the buckets parts and the shard plan."""
    where = {m["key"]: (f"{SHARDS_DIR}/{c['output']}", m["member_key"]) for c in plan for m in c["members"]}
    keys = samples.column("key").to_pylist()
    missing = [k for k in keys if k not in where]
    if missing:
        raise RuntimeError(f"samples {missing[:5]} have no shard in the plan")
    samples = samples.append_column("shard", pa.array([where[k][0] for k in keys], pa.string()))
    samples = samples.append_column("member_key", pa.array([where[k][1] for k in keys], pa.string()))
    return records.conform(samples, records.MANIFEST_SCHEMA).sort_by("key")
