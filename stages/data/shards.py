"""WebDataset shards, one bucket per tar, written once: the tar format and the bucketed shard writer.

A :class:`ShardWriter` keeps one open tar per bucket and appends each kept sample to its bucket's tar as it arrives
(`<member>.<ext>` with the bytes as they are, then `<member>.json` with the metadata); a tar is closed when it holds
`buckets.samples_per_shard` samples or `buckets.shard_target_mb`, or has been open `buckets.shard_max_open_s`. Tars
are written atomically (stages/data/../pipeline/storage.py ``open_atomic``), so a shard that exists is complete.

A unit is *done* when every one of its inputs arrived and each kept sample sits in a closed tar: then its work part
(`work/part-<unit>.parquet`, the manifest rows with each sample's shard and byte offsets) is written, after its
rejects. After a kill the units without a part are processed again; their samples that had reached closed tars are
written anew, and those earlier copies stay in their tars unreferenced (the manifest and the shard index never list
them; `stats.json` counts their bytes). Members are byte-deterministic (fixed mtime, owner, mode).
"""

from __future__ import annotations

import json
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import storage
from sdxl.buckets import bucket_name
from stages.data import records
from stages.data.process import TAR_FORMATS

SHARDS_DIR = "shards"
WORK_DIR = "work"
BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def member_stem(key: str) -> str:
    """The WebDataset-safe member stem of a key (`.`, `/` and `\\` become `_`)."""
    return key.replace("/", "_").replace(".", "_").replace("\\", "_")


def tar_member(name: str, data: bytes | memoryview) -> list[bytes | memoryview]:
    """[header, data, padding to 512 bytes] of one tar member (USTAR, mtime 0, mode 0644, owner 0). The data is
    not copied: the writer streams the pieces as they are."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    header = info.tobuf(format=tarfile.USTAR_FORMAT if len(name) <= 100 else tarfile.PAX_FORMAT)
    return [header, data, b"\0" * (-len(data) % BLOCK)]


def sample_json(row: dict[str, Any]) -> bytes:
    """The `<member>.json` member: what training needs besides the pixels."""
    meta = {
        "key": row["key"], "caption": row["caption"], "caption_synthetic": row["caption_synthetic"],
        "orig_h": row["orig_h"], "orig_w": row["orig_w"], "bucket_h": row["bucket_h"], "bucket_w": row["bucket_w"],
        "format": row["format"], "sha256": row["sha256"],
        "scores": {name: row.get(name) for name in records.SCORE_COLUMNS},
        "meta": records.load_meta(row.get("meta_json")),
    }
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def sample_members(row: dict[str, Any], stem: str, image: bytes | memoryview | None = None
                   ) -> tuple[list[bytes | memoryview], int, int]:
    """(byte pieces, image data offset within them, total size) of one sample's two members; ``image`` (a view into
    the block's buffer) replaces ``row["image"]``."""
    ext = TAR_FORMATS.get(row["format"])
    if ext is None:
        raise ValueError(f"sample {row['key']!r} has format {row['format']!r}, which a shard cannot hold as is")
    image_pieces = tar_member(f"{stem}.{ext}", row["image"] if image is None else image)
    pieces = image_pieces + tar_member(f"{stem}.json", sample_json(row))
    return pieces, len(image_pieces[0]), sum(len(p) for p in pieces)


def tar_bytes(rows: list[dict[str, Any]], stems: list[str]) -> bytes:
    """A whole WebDataset tar of ``rows`` (tests, the benchmark baseline): the bytes the writer streams."""
    out = []
    for row, stem in zip(rows, stems):
        out.extend(sample_members(row, stem)[0])
    return b"".join(out) + END_OF_ARCHIVE


@dataclass
class OpenShard:
    """One bucket's tar being written."""

    bucket: str
    name: str  # relative to the dataset folder
    stream_cm: Any
    stream: Any
    opened_at: float
    size: int = 0
    samples: int = 0
    stems: set[str] = field(default_factory=set)
    units: set[int] = field(default_factory=set)


@dataclass
class UnitState:
    total: int
    node: str | None = None
    seen: int = 0
    keys: set[str] = field(default_factory=set)
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    open_shards: set[str] = field(default_factory=set)


class ShardWriter:
    """Bucketed tars for the samples it is sent, and each unit's work part once the unit is done (pure Python; the
    streaming pass runs it as a Ray actor)."""

    def __init__(self, dataset_dir: str, tag: str, samples_per_shard: int, shard_target_bytes: int,
                 max_open_s: float):
        if samples_per_shard < 1:
            raise ValueError(f"buckets.samples_per_shard must be >= 1, got {samples_per_shard}")
        self.dataset_dir, self.tag = dataset_dir, tag
        self.work_dir = storage.join(dataset_dir, WORK_DIR)
        self.samples_per_shard, self.target_bytes, self.max_open_s = samples_per_shard, shard_target_bytes, max_open_s
        self.open: dict[str, OpenShard] = {}
        self.units: dict[int, UnitState] = {}
        self.done_units: set[int] = set()  # a block sent again (a retried task) must not be written twice
        self.sequence = 0
        self.closed = 0

    # ---- shards
    def _open_shard(self, bucket: str) -> OpenShard:
        name = f"{SHARDS_DIR}/{bucket}/{bucket}-{self.tag}-{self.sequence:05d}.tar"
        self.sequence += 1
        cm = storage.open_atomic(storage.join(self.dataset_dir, *name.split("/")))
        shard = OpenShard(bucket, name, cm, cm.__enter__(), time.monotonic())
        self.open[bucket] = shard
        return shard

    def _close_shard(self, shard: OpenShard) -> None:
        shard.stream.write(END_OF_ARCHIVE)
        shard.stream_cm.__exit__(None, None, None)
        del self.open[shard.bucket]
        self.closed += 1
        for unit in shard.units:
            self.units[unit].open_shards.discard(shard.name)

    def _add(self, row: dict[str, Any], image: memoryview, state: UnitState, unit: int) -> None:
        bucket = bucket_name((row["bucket_h"], row["bucket_w"]))
        shard = self.open.get(bucket) or self._open_shard(bucket)
        stem, n = member_stem(row["key"]), 1
        while stem in shard.stems:  # two keys that map to one member name: keep both, apart
            stem, n = f"{member_stem(row['key'])}_{n}", n + 1
        shard.stems.add(stem)
        pieces, image_at, size = sample_members(row, stem, image)
        for piece in pieces:
            shard.stream.write(piece)
        location = {"shard": shard.name, "member_key": stem, "image_offset": shard.size + image_at,
                    "image_size": len(image), "sample_offset": shard.size, "sample_size": size}
        shard.size += size
        shard.samples += 1
        shard.units.add(unit)
        state.open_shards.add(shard.name)
        state.rows.append({**row, **location})
        if shard.samples >= self.samples_per_shard or shard.size >= self.target_bytes:
            self._close_shard(shard)

    # ---- units
    def _finish_units(self) -> list[int]:
        done = [u for u, s in self.units.items() if s.seen == s.total and not s.open_shards]
        for unit in done:
            state = self.units.pop(unit)
            write_unit(self.work_dir, unit, state.rows, state.rejects, state.node)
            self.done_units.add(unit)
        return done

    def append(self, table: pa.Table) -> list[int]:
        """Write a block of sample rows; returns the units it completed."""
        images = _binary_views(table.column("image"))  # the bytes stay in the block's buffer until written
        for row, image in zip(table.drop_columns(["image"]).to_pylist(), images):
            unit = int(row["unit"])
            if unit in self.done_units:
                continue
            state = self.units.setdefault(unit, UnitState(int(row["unit_size"]), row.get("node")))
            if row["key"] in state.keys:
                continue
            state.keys.add(row["key"])
            state.seen += 1
            if row["reject_reason"] is not None:
                state.rejects.append(records.reject_row(row["key"], row["reject_stage"], row["reject_reason"],
                                                        row["reject_detail"] or ""))
            else:
                self._add(row, image, state, unit)
        return self.tick()

    def tick(self) -> list[int]:
        """Close tars open longer than `shard_max_open_s`, then write the units that are done."""
        now = time.monotonic()
        for shard in list(self.open.values()):
            if now - shard.opened_at >= self.max_open_s:
                self._close_shard(shard)
        return self._finish_units()

    def close(self) -> dict[str, Any]:
        """Close every tar; every unit sent must now be done."""
        for shard in list(self.open.values()):
            self._close_shard(shard)
        self._finish_units()
        if self.units:
            raise RuntimeError(f"shard writer {self.tag}: units {sorted(self.units)[:5]} did not receive all their "
                               f"samples ({[(s.seen, s.total) for s in list(self.units.values())[:5]]})")
        return {"writer": self.tag, "shards": self.closed}

    def abort(self) -> None:
        """Drop the open tars unwritten (a failed run): their temp files go, nothing becomes visible."""
        for shard in list(self.open.values()):
            shard.stream_cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self.open.clear()


def _binary_views(column: pa.ChunkedArray) -> list[memoryview | None]:
    """A memoryview of each value of a binary column (None for nulls), without copying the data."""
    import numpy as np

    views: list[memoryview | None] = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = memoryview(data) if data is not None else memoryview(b"")
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        views += [data[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(chunk))]
    return views


def write_unit(work_dir: str, unit: int, rows: list[dict[str, Any]], rejects: list[dict[str, Any]],
               node: str | None = None) -> None:
    """A unit's rejects, then its work part (the part marks the unit done, so it is written last)."""
    storage.write_bytes_atomic(storage.join(work_dir, records.part_name(unit, "rejects")),
                               records.parquet_bytes(records.rejects_table(rejects)))
    part = records.table_from_rows(sorted(rows, key=lambda r: r["key"]), records.WORK_SCHEMA)
    part = part.replace_schema_metadata({"reader_node": node or ""})
    storage.write_bytes_atomic(storage.join(work_dir, records.part_name(unit)), records.parquet_bytes(part))
