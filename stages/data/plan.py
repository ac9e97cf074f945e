"""The work plan of a data run: `ingest.source` cut into *units* of about `ingest.chunk_size` samples, written in parts.

A unit is what one Ray task reads and processes: a slice of a folder listing, one tar, or a row range of a parquet
file (image shards or a URL list). The planner streams: folders are listed one folder at a time, CSV / JSON-lines URL
lists are read in batches and copied into parquet URL parts, and unit descriptors are flushed to
`<dataset>/plan/units-NNNNNN.parquet` (one row group per unit, so a task reads only its own unit) every few thousand
units. Nothing per sample is held: planning 10⁷ samples costs the memory of one plan part. `_plan.json`, written
last, marks a finished plan; a re-run reuses it (same units, same keys).
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from stages.data import records, sources

PLAN_DIR = "plan"
PLAN_INFO = "_plan.json"
ITEM_TYPE = pa.struct([("rel", pa.string()), ("key", pa.string()), ("txt", pa.string()), ("json", pa.string()),
                       ("key_collision", pa.bool_())])
UNIT_SCHEMA = pa.schema([
    ("unit", pa.int64()), ("kind", pa.string()), ("uri", pa.string()), ("prefix", pa.string()),
    ("row_groups", pa.list_(pa.int32())), ("start", pa.int64()), ("offset", pa.int64()), ("count", pa.int64()),
    ("items", pa.list_(ITEM_TYPE)),
])
URL_ROW_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("extra_json", pa.string())])
PART_ROWS = 100_000  # items or URL rows per plan part: a few tens of MB at most


class _Parts:
    """Row groups appended to a parquet part in memory, written atomically when the part is full."""

    def __init__(self, folder: str, prefix: str, schema: pa.Schema):
        self.folder, self.prefix, self.schema = folder, prefix, schema
        self.index, self.rows, self.groups = 0, 0, 0
        self._buf: io.BytesIO | None = None
        self._writer: pq.ParquetWriter | None = None

    @property
    def uri(self) -> str:
        return storage.join(self.folder, records.part_name(self.index, self.prefix))

    def append(self, table: pa.Table, weight: int) -> tuple[str, int]:
        """Add ``table`` as one row group; (part URI, row group index)."""
        if self._writer is None:
            self._buf = io.BytesIO()
            self._writer = pq.ParquetWriter(self._buf, self.schema, compression="zstd")
        self._writer.write_table(table.cast(self.schema), row_group_size=max(1, table.num_rows))
        where = (self.uri, self.groups)
        self.groups += 1
        self.rows += weight
        if self.rows >= PART_ROWS or self.groups >= 4096:
            self.flush()
        return where

    def flush(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        storage.write_bytes_atomic(self.uri, self._buf.getvalue())
        self.index, self.rows, self.groups, self._buf, self._writer = self.index + 1, 0, 0, None, None


class PlanWriter:
    """Collects unit descriptors (and the URL rows of text URL lists) into plan parts."""

    def __init__(self, plan_dir: str):
        self.plan_dir = plan_dir
        self.units = _Parts(plan_dir, "units", UNIT_SCHEMA)
        self.url_rows = _Parts(plan_dir, "urls", URL_ROW_SCHEMA)
        self.count = 0
        self.inputs = 0  # samples the plan names (tars count only when read)

    def add(self, kind: str, uri: str, prefix: str = "", row_groups: list[int] | None = None, start: int = 0,
            offset: int = 0, count: int = 0, items: list[dict] | None = None) -> None:
        row = {"unit": self.count, "kind": kind, "uri": uri, "prefix": prefix, "row_groups": row_groups or [],
               "start": start, "offset": offset, "count": count, "items": items or []}
        self.units.append(records.table_from_rows([row], UNIT_SCHEMA), max(1, len(items or ())))
        self.count += 1
        self.inputs += len(items) if items is not None else count

    def add_url_rows(self, rows: list[dict], start: int, prefix: str) -> None:
        uri, group = self.url_rows.append(records.table_from_rows(rows, URL_ROW_SCHEMA), len(rows))
        self.add("url_rows", uri, prefix, [group], start, 0, len(rows))

    def close(self, info: dict[str, Any]) -> dict[str, Any]:
        self.units.flush()
        self.url_rows.flush()
        info = {**info, "units": self.count, "planned_inputs": self.inputs}
        storage.write_json_atomic(storage.join(self.plan_dir, PLAN_INFO), info)
        return info


# --------------------------------------------------------------------------------------------- folders
Lister = Callable[[str], tuple[list[tuple[str, int]], list[str]]]


def walk(root: str, lister: Lister = storage.list_entries) -> Iterator[tuple[str, list[str]]]:
    """(relative folder, sorted file names) for every folder under ``root``, depth first, one listing at a time."""
    stack = [""]
    while stack:
        rel = stack.pop()
        files, folders = lister(storage.join(root, *rel.split("/")) if rel else root)
        yield rel, [name for name, _ in files]
        stack.extend(posixpath.join(rel, name) if rel else name for name in reversed(folders))


def folder_items(rel_dir: str, names: list[str], extensions: tuple[str, ...]) -> tuple[list[dict], int]:
    """Items of one folder's images with their same-stem .txt/.json sidecars; also how many files are neither
    (not counting markers and hidden files)."""
    present = set(names)
    images = [n for n in names if n.lower().endswith(extensions)]
    stems = {sources.strip_extension(n) for n in images}
    sidecars = {stem + ext for stem in stems for ext in (".txt", ".json")}
    # Job markers (_SUCCESS.json, which demo_data writes) and hidden files (.DS_Store) are not stray inputs, as
    # for parquet and tar sources; images are ingested whatever their name.
    ignored = sum(1 for n in names if n not in sidecars and not n.lower().endswith(extensions)
                  and not n.startswith(("_", ".")))
    items, used = [], set()
    for name in images:  # sorted: the first file of a colliding stem keeps the short key
        stem = sources.strip_extension(name)
        rel = posixpath.join(rel_dir, name) if rel_dir else name
        key_stem = posixpath.join(rel_dir, stem) if rel_dir else stem
        key = key_stem if stem not in used else rel
        used.add(stem)
        items.append({"rel": rel, "key": key, "key_collision": key != key_stem,
                      "txt": (posixpath.join(rel_dir, stem + ".txt") if rel_dir else stem + ".txt")
                      if stem + ".txt" in present else None,
                      "json": (posixpath.join(rel_dir, stem + ".json") if rel_dir else stem + ".json")
                      if stem + ".json" in present else None})
    return items, ignored


def iter_folder_items(source: str, extensions: tuple[str, ...], lister: Lister, counts: dict[str, int]
                      ) -> Iterator[dict]:
    """Items of every image under ``source`` in path order (a sub-folder's items at the sub-folder's name), one
    folder listing at a time; ``counts["ignored_files"]`` gathers the files that are neither images nor sidecars."""

    def visit(rel_dir: str) -> Iterator[dict]:
        files, folders = lister(storage.join(source, *rel_dir.split("/")) if rel_dir else source)
        items, ignored = folder_items(rel_dir, [name for name, _ in files], extensions)
        counts["ignored_files"] = counts.get("ignored_files", 0) + ignored
        entries = [(posixpath.basename(item["rel"]), item) for item in items] + [(name, None) for name in folders]
        for name, item in sorted(entries, key=lambda entry: entry[0]):
            if item is None:
                yield from visit(posixpath.join(rel_dir, name) if rel_dir else name)
            else:
                yield item

    yield from visit("")


def plan_folder(writer: PlanWriter, source: str, chunk_size: int, extensions: tuple[str, ...],
                lister: Lister = storage.list_entries) -> dict[str, Any]:
    counts: dict[str, int] = {"ignored_files": 0}
    pending: list[dict] = []
    for item in iter_folder_items(source, extensions, lister, counts):
        pending.append(item)
        if len(pending) == chunk_size:
            writer.add("folder", source, items=pending)
            pending = []
    if pending:
        writer.add("folder", source, items=pending)
    return counts


# --------------------------------------------------------------------------------------------- parquet and tars
def _files(source: str, suffixes: tuple[str, ...]) -> tuple[list[str], str]:
    """(matching files, their base folder) of a file or folder source, in walk order."""
    if storage.is_file(source):
        return [source], posixpath.dirname(source.replace("\\", "/"))
    found = [storage.join(source, *posixpath.join(rel, n).split("/")) if rel else storage.join(source, n)
             for rel, names in walk(source) for n in names
             if n.lower().endswith(suffixes) and not n.startswith(("_", "."))]
    return found, source


def _relative(uri: str, base: str) -> str:
    return str(uri)[len(str(base).rstrip("/").rstrip("\\")):].lstrip("/").lstrip("\\").replace("\\", "/")


def row_group_sizes(uri: str) -> list[int]:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def plan_parquet_rows(writer: PlanWriter, kind: str, uri: str, prefix: str, chunk_size: int) -> None:
    """Units of ``chunk_size`` consecutive rows; each names the row groups it spans and its slice of them."""
    sizes = row_group_sizes(uri)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    for begin in range(0, total, chunk_size):
        end = min(total, begin + chunk_size)
        groups = [g for g, (s, n) in enumerate(zip(starts, sizes)) if n and s < end and s + n > begin]
        writer.add(kind, uri, prefix, groups, begin, begin - starts[groups[0]], end - begin)


def plan_image_parquet(writer: PlanWriter, source: str, chunk_size: int) -> dict[str, Any]:
    files, base = _files(source, (".parquet",))
    for uri in files:
        plan_parquet_rows(writer, "parquet", uri, sources.strip_extension(_relative(uri, base)) + "/", chunk_size)
    return {"files": len(files)}


def plan_tars(writer: PlanWriter, source: str) -> dict[str, Any]:
    files, base = _files(source, (".tar",))
    for uri in files:
        writer.add("webdataset", uri, sources.strip_extension(_relative(uri, base)))
    return {"files": len(files)}


# --------------------------------------------------------------------------------------------- URL lists
def _text_batches(uri: str, fmt: str) -> Iterator[list[dict]]:
    """Rows of a CSV/TSV/JSON-lines URL list in batches (streamed), or of a JSON array (read whole)."""
    fs, path = storage.resolve(uri)
    if fmt == "json":
        yield list(json.loads(storage.read_bytes(uri).decode("utf-8")))
        return
    with fs.open_input_stream(path) as stream:
        if fmt == "jsonl":
            import pyarrow.json as pajson

            reader = pajson.open_json(stream, read_options=pajson.ReadOptions(block_size=1 << 22))
        else:
            import pyarrow.csv as pacsv

            reader = pacsv.open_csv(stream, parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                                    convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        for batch in reader:
            yield batch.to_pylist()


def plan_url_list(writer: PlanWriter, uri: str, prefix: str, chunk_size: int, url_column: str,
                  caption_column: str) -> int:
    """Units over one URL list; parquet lists are read in place, text lists copied into URL parts. Returns rows."""
    fmt = uri.lower().rsplit(".", 1)[-1]
    if fmt == "parquet":
        names = sources.parquet_schema(uri).names
        if url_column not in names:
            raise ValueError(f"URL list {uri} has no {url_column!r} column (ingest.download.url_column); "
                             f"columns: {names}")
        plan_parquet_rows(writer, "urls", uri, prefix, chunk_size)
        return sum(row_group_sizes(uri))
    rows, start = [], 0
    for batch in _text_batches(uri, fmt):
        if batch and url_column not in batch[0]:
            raise ValueError(f"URL list {uri} has no {url_column!r} column (ingest.download.url_column); "
                             f"columns: {sorted(batch[0])}")
        for row in batch:
            extra = {k: v for k, v in row.items() if k not in (url_column, caption_column)}
            caption = row.get(caption_column)
            rows.append({"url": row.get(url_column), "caption": None if caption is None else str(caption),
                         "extra_json": records.dump_meta(extra) if extra else None})
            if len(rows) == chunk_size:
                writer.add_url_rows(rows, start, prefix)
                start, rows = start + len(rows), []
    if rows:
        writer.add_url_rows(rows, start, prefix)
    return start + len(rows)


def plan_urls(writer: PlanWriter, source: str, chunk_size: int, url_column: str, caption_column: str) -> dict:
    files, base = _files(source, (".parquet",) + sources.URL_LIST_SUFFIXES)
    if not files:
        raise ValueError(f"ingest.source {source}: no URL list file (.csv/.tsv/.jsonl/.json/.parquet)")
    single = len(files) == 1
    rows = sum(plan_url_list(writer, uri, "" if single else sources.strip_extension(_relative(uri, base)) + "/",
                             chunk_size, url_column, caption_column) for uri in files)
    return {"files": len(files), "urls": rows}


# --------------------------------------------------------------------------------------------- reading a plan
def load_info(plan_dir: str) -> dict[str, Any] | None:
    uri = storage.join(plan_dir, PLAN_INFO)
    return storage.read_json(uri) if storage.exists(uri) else None


def unit_index(plan_dir: str) -> Iterator[tuple[int, str, int]]:
    """(unit, plan part, row group) of every unit, reading only the `unit` column of each part."""
    for uri in records.list_parts(plan_dir, "units-"):
        units = storage.read_parquet(uri, columns=["unit"]).column("unit").to_pylist()
        for group, unit in enumerate(units):
            yield int(unit), uri, group


def read_unit(part_uri: str, row_group: int) -> dict[str, Any]:
    fs, path = storage.resolve(part_uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_group(row_group).to_pylist()[0]
