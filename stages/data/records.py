"""Column schemas of the data stages and the I/O of their parts, rejects and manifests.

A stage folder `<dataset>/<stage>/` holds `part-NNNNN.parquet` (kept samples) and `rejects-NNNNN.parquet` (rejected
samples) per input chunk, plus `_SUCCESS` once every chunk is done (see docs/architecture.md, "Data contracts").
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

SCORE_COLUMNS = ("clip_score", "aesthetic_score", "watermark_prob", "nsfw_prob")

INGEST_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("caption", pa.string()),
    pa.field("source", pa.string()),
    pa.field("orig_h", pa.int32()),
    pa.field("orig_w", pa.int32()),
    pa.field("format", pa.string()),
    pa.field("meta_json", pa.string()),
]
FILTER_FIELDS = [pa.field("sha256", pa.string())] + [pa.field(name, pa.float32()) for name in SCORE_COLUMNS]
CAPTION_FIELDS = [pa.field("caption_synthetic", pa.string())]
BUCKET_FIELDS = [pa.field("bucket_h", pa.int32()), pa.field("bucket_w", pa.int32())]

INGEST_SCHEMA = pa.schema(INGEST_FIELDS)
FILTER_SCHEMA = pa.schema(INGEST_FIELDS + FILTER_FIELDS)
CAPTION_SCHEMA = pa.schema(INGEST_FIELDS + FILTER_FIELDS + CAPTION_FIELDS)
BUCKET_SCHEMA = pa.schema(INGEST_FIELDS + FILTER_FIELDS + CAPTION_FIELDS + BUCKET_FIELDS)

REJECT_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])

MANIFEST_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("member_key", pa.string()),
    pa.field("bucket_h", pa.int32()),
    pa.field("bucket_w", pa.int32()),
    pa.field("orig_h", pa.int32()),
    pa.field("orig_w", pa.int32()),
    pa.field("caption", pa.string()),
    pa.field("caption_synthetic", pa.string()),
    pa.field("sha256", pa.string()),
    *[pa.field(name, pa.float32()) for name in SCORE_COLUMNS],
    pa.field("format", pa.string()),
    pa.field("source", pa.string()),
    pa.field("meta_json", pa.string()),
])

SUCCESS_NAME = "_SUCCESS"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def rejects_name(index: int) -> str:
    return f"rejects-{index:05d}.parquet"


def table_from_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """A table with exactly ``schema``'s columns; missing keys become nulls."""
    columns = {field.name: [row.get(field.name) for row in rows] for field in schema}
    return pa.table(columns, schema=schema)


def reject_row(key: str, stage: str, reason: str, detail: str = "") -> dict[str, str]:
    return {"key": key, "stage": stage, "reason": reason, "detail": str(detail)[:1000]}


def rejects_table(rows: Iterable[dict[str, str]]) -> pa.Table:
    return table_from_rows(list(rows), REJECT_SCHEMA)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table`` to ``schema``, adding null columns the table lacks."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def load_meta(meta_json: str | None) -> dict[str, Any]:
    if not meta_json:
        return {}
    try:
        value = json.loads(meta_json)
    except json.JSONDecodeError:
        return {"unparsed": meta_json}
    return value if isinstance(value, dict) else {"value": value}


def dump_meta(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)


def list_parts(stage_dir: str) -> list[str]:
    return [uri for uri in storage.list_files(stage_dir, suffix=".parquet")
            if uri.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].startswith("part-")]


def list_reject_parts(stage_dir: str) -> list[str]:
    return [uri for uri in storage.list_files(stage_dir, suffix=".parquet")
            if uri.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].startswith("rejects-")]


def num_rows(uri: str) -> int:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_grouped_parquet_atomic(table: pa.Table, uri: str, group_columns: list[str]) -> None:
    """Write ``table`` sorted by ``group_columns`` + key, one parquet row group per group, so a reader can fetch a
    single group of a part without reading the others."""
    table = table.sort_by([(c, "ascending") for c in group_columns] + [("key", "ascending")])
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as writer:
        if table.num_rows == 0:
            writer.write_table(table)
        start = 0
        groups = list(zip(*(table.column(c).to_pylist() for c in group_columns)))
        for end in range(1, len(groups) + 1):
            if end == len(groups) or groups[end] != groups[start]:
                writer.write_table(table.slice(start, end - start), row_group_size=end - start)
                start = end
    storage.write_bytes_atomic(uri, buf.getvalue())


def read_row_groups(uri: str, row_groups: list[int], columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_groups(row_groups, columns=columns)


def row_group_index(uri: str, columns: list[str]) -> pa.Table:
    """``columns`` of every row of a parquet file plus its `row_group` number (reads only those columns)."""
    fs, path = storage.resolve(uri)
    tables = []
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        for i in range(pf.num_row_groups):
            t = pf.read_row_group(i, columns=columns)
            tables.append(t.append_column("row_group", pa.array([i] * t.num_rows, pa.int32())))
    return pa.concat_tables(tables) if tables else pa.table({})


def read_tables(uris: list[str], schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Concatenate parquet files (all with ``schema``); an empty table with the schema when there are none."""
    wanted = pa.schema([schema.field(name) for name in columns]) if columns else schema
    tables = [conform(storage.read_parquet(uri, columns=columns), wanted) for uri in uris]
    if not tables:
        return wanted.empty_table()
    return pa.concat_tables(tables)


def read_rejects(stage_dir: str) -> pa.Table:
    return read_tables(list_reject_parts(stage_dir), REJECT_SCHEMA)
