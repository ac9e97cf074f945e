"""Column schemas of the data stages and the I/O of their parquet parts.

Three kinds of table (docs/architecture.md, "Data contracts"):
- *samples* flow through the streaming pass: one row per input sample, image bytes included while the sample is kept,
  a reject reason once it is not (``SAMPLE_SCHEMA``);
- the *manifest* has one row per kept sample, no bytes, with where its members sit in which shard
  (``MANIFEST_SCHEMA``); ``<dataset>/manifest.parquet`` is a parquet dataset folder of such parts;
- *rejects* (``REJECT_SCHEMA``): key, stage, reason, detail; ``<dataset>/rejects.parquet`` likewise.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

SCORE_COLUMNS = ("clip_score", "aesthetic_score", "watermark_prob", "nsfw_prob")

_METADATA_FIELDS = [
    pa.field("caption", pa.string()),
    pa.field("caption_synthetic", pa.string()),
    pa.field("source", pa.string()),
    pa.field("orig_h", pa.int32()),
    pa.field("orig_w", pa.int32()),
    pa.field("format", pa.string()),
    pa.field("meta_json", pa.string()),
    pa.field("sha256", pa.string()),
    *[pa.field(name, pa.float32()) for name in SCORE_COLUMNS],
    pa.field("bucket_h", pa.int32()),
    pa.field("bucket_w", pa.int32()),
]

SAMPLE_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("unit", pa.int64()),
    pa.field("unit_size", pa.int32()),  # inputs of the unit: the writer knows from it when a unit is complete
    pa.field("node", pa.string()),      # the Ray node that read the unit
    pa.field("image", pa.binary()),     # null once the sample is rejected
    *_METADATA_FIELDS,
    pa.field("reject_stage", pa.string()),
    pa.field("reject_reason", pa.string()),
    pa.field("reject_detail", pa.string()),
])

LOCATION_FIELDS = [
    pa.field("shard", pa.string()),           # relative to the dataset folder: shards/<H>x<W>/<name>.tar
    pa.field("member_key", pa.string()),      # the sample's member stem inside the tar (WebDataset __key__)
    pa.field("image_offset", pa.int64()),     # byte offset of the image member's data in the tar
    pa.field("image_size", pa.int64()),
    pa.field("sample_offset", pa.int64()),    # first byte of the sample's first tar header
    pa.field("sample_size", pa.int64()),      # bytes of all its members, headers and padding included
]

MANIFEST_SCHEMA = pa.schema([pa.field("key", pa.string()), *LOCATION_FIELDS, *_METADATA_FIELDS])
# What a shard writer records per unit: the manifest rows plus the unit, so dedup can name the part to change.
WORK_SCHEMA = pa.schema([*MANIFEST_SCHEMA, pa.field("unit", pa.int64())])

REJECT_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
])

SUCCESS_NAME = "_SUCCESS"
MANIFEST_NAME = "manifest.parquet"
REJECTS_NAME = "rejects.parquet"


def part_name(index: int, prefix: str = "part") -> str:
    return f"{prefix}-{index:06d}.parquet"


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


def _basename(uri: str) -> str:
    return uri.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]


def list_parts(folder: str, prefix: str = "part-") -> list[str]:
    """The parquet files of a parts folder whose names start with ``prefix``, sorted."""
    return [uri for uri in storage.list_files(folder, suffix=".parquet") if _basename(uri).startswith(prefix)]


def part_index(uri: str) -> int:
    """The number in ``<prefix>-NNNNNN.parquet``."""
    return int(_basename(uri).rsplit("-", 1)[-1].split(".", 1)[0])


def num_rows(uri: str) -> int:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue()


def read_tables(uris: list[str], schema: pa.Schema, columns: list[str] | None = None,
                filters: Any = None) -> pa.Table:
    """Concatenate parquet files (all with ``schema``); an empty table with the schema when there are none."""
    wanted = pa.schema([schema.field(name) for name in columns]) if columns else schema
    tables = []
    for uri in uris:
        fs, path = storage.resolve(uri)
        tables.append(conform(pq.read_table(path, filesystem=fs, columns=columns, filters=filters), wanted))
    return pa.concat_tables(tables) if tables else wanted.empty_table()


def read_dataset(uri: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """A parquet dataset folder of parts (or one file: tests and older datasets write those) as one table."""
    if storage.is_file(uri):
        return read_tables([uri], schema, columns)
    return read_tables(list_parts(uri), schema, columns)


def dataset_parts(uri: str) -> list[str]:
    """The files of a parquet dataset: its parts when ``uri`` is a folder, else ``[uri]`` (or [] when missing)."""
    if storage.is_file(uri):
        return [uri]
    return list_parts(uri)
