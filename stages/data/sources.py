"""Reading the samples of one work unit of `ingest.source`: a folder of images, WebDataset tars, or parquet files
with image bytes (URL lists are in stages/data/download.py).

A reader yields *raw samples*: dicts with key, image (bytes or None), caption_raw (bytes/str/None), source and meta
(dict); an input that holds no image at all carries ``reject`` = (stage, reason, detail) instead. Units come from
stages/data/plan.py; their keys are fixed by the plan, so a re-read gives the same keys.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
# Re-exported: stage code and the evaluation import them from here.
from stages.data.images import decode_rgb, probe_image, sniff_payload  # noqa: F401
from stages.data.unit_buffer import UnitBuffer

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "jpeg", "img", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "txt", "text")
SOURCE_KINDS = ("folder", "urls", "webdataset", "parquet")
URL_LIST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


# --------------------------------------------------------------------------------------------- source kinds
def detect_source_kind(source: str, source_type: str = "auto") -> str:
    """One of folder | urls | webdataset | parquet for ``ingest.source``. A folder is looked at one level at a time
    (the first level with a telling file decides), so a tree of millions of files is not listed here."""
    if source_type != "auto":
        if source_type not in SOURCE_KINDS:
            raise ValueError(f"ingest.source_type must be auto or one of {SOURCE_KINDS}, got {source_type!r}")
        return source_type
    if not storage.exists(source):
        raise FileNotFoundError(f"ingest.source does not exist: {source}")
    if storage.is_file(source):
        return _file_kind(source)
    pending, text_lists = [source], False
    while pending:
        folder = pending.pop(0)
        files, folders = storage.list_entries(folder)
        names = [name.lower() for name, _ in files if not name.startswith(("_", "."))]  # markers, hidden files
        if any(n.endswith(IMAGE_EXTENSIONS) for n in names):
            return "folder"
        if any(n.endswith(".tar") for n in names):
            return "webdataset"
        parquets = [name for name, _ in files if name.lower().endswith(".parquet")]
        if parquets:
            return "urls" if is_url_list(storage.join(folder, parquets[0])) else "parquet"
        text_lists = text_lists or any(n.endswith(URL_LIST_SUFFIXES) for n in names)
        pending += [storage.join(folder, name) for name in folders]
    if text_lists:  # only when no image, tar or parquet is anywhere: .json files may be sidecars
        return "urls"
    raise ValueError(f"ingest.source {source} holds no images, .tar shards, .parquet files or URL lists")


def _file_kind(source: str) -> str:
    lower = source.lower()
    if lower.endswith(URL_LIST_SUFFIXES):
        return "urls"
    if lower.endswith(".tar"):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "urls" if is_url_list(source) else "parquet"
    raise ValueError(f"ingest.source {source} is a file of unknown kind (expected .csv/.jsonl/.parquet/.tar)")


def is_url_list(parquet_uri: str) -> bool:
    names = set(parquet_schema(parquet_uri).names)
    return "url" in names and not names.intersection(IMAGE_COLUMNS)


def parquet_schema(uri: str) -> pa.Schema:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).schema_arrow


def strip_extension(rel: str) -> str:
    head, tail = posixpath.split(rel)
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return posixpath.join(head, stem) if head else stem


def rejected(key: str, source: str, stage: str, reason: str, detail: str) -> dict[str, Any]:
    return {"key": key, "source": source, "reject": (stage, reason, detail)}


# --------------------------------------------------------------------------------------------- folder units
def read_folder_unit(unit: dict) -> Iterator[dict[str, Any]]:
    root = unit["uri"]
    paths = [storage.join(root, *item["rel"].split("/")) for item in unit["items"]]
    # A local folder's images go side by side into one buffer: the unit's image column then wraps it (no copy).
    buffer = None if storage.is_remote(root) or root.startswith("file://") else UnitBuffer(paths)
    for index, (item, uri) in enumerate(zip(unit["items"], paths)):
        meta: dict[str, Any] = {}
        if item.get("key_collision"):
            meta["flags"] = ["key_collision"]
        caption_raw = storage.read_bytes(storage.join(root, *item["txt"].split("/"))) if item.get("txt") else None
        if item.get("json"):
            sidecar_raw = storage.read_bytes(storage.join(root, *item["json"].split("/")))
            try:
                meta["sidecar"] = json.loads(sidecar_raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                meta.setdefault("flags", []).append("sidecar_invalid")
                meta["sidecar_error"] = str(err)
        sample = {"key": item["key"], "caption_raw": caption_raw, "source": uri, "meta": meta}
        if buffer is None:
            yield {**sample, "image": storage.read_bytes(uri)}
        else:
            image = buffer.read(index, uri)  # plain bytes when the file changed size: then not the buffer's
            yield {**sample, "image": image, "image_buffer": buffer if isinstance(image, memoryview) else None}


# --------------------------------------------------------------------------------------------- webdataset units
def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    head, tail = posixpath.split(name)
    stem, _, ext = tail.partition(".")
    return (posixpath.join(head, stem) if head else stem), ext.lower()


def _tar_sample(unit: dict, member_key: str, parts: dict[str, bytes]) -> dict[str, Any]:
    key = f"{unit['prefix']}/{member_key}"
    image_ext = next((e for e in sorted(parts) if "." + e in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        return rejected(key, f"{unit['uri']}#{member_key}", "ingest", "missing_image",
                        f"tar members {sorted(parts)} hold no image")
    meta: dict[str, Any] = {"source_key": member_key}
    caption_raw = parts.get("txt")
    if "json" in parts:
        try:
            member_meta = json.loads(parts["json"].decode("utf-8"))
            meta["sidecar"] = member_meta
            if caption_raw is None and isinstance(member_meta, dict) and "caption" in member_meta:
                caption_raw = str(member_meta["caption"])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            meta["flags"] = ["sidecar_invalid"]
            meta["sidecar_error"] = str(err)
    return {"key": key, "image": parts[image_ext], "caption_raw": caption_raw,
            "source": f"{unit['uri']}#{member_key}.{image_ext}", "meta": meta}


def read_tar_unit(unit: dict) -> Iterator[dict[str, Any]]:
    """Samples of one tar, streamed: the members of a WebDataset sample are adjacent, so a sample is complete when
    the next key starts. A key that comes back after other keys is a fault of the tar: that later group is rejected
    (`repeated_key`) under the key with a ``#repeat<n>`` suffix, so every input stays accounted for exactly once."""
    fs, path = storage.resolve(unit["uri"])
    seen: dict[str, int] = {}
    current, parts = None, {}

    def finish() -> dict[str, Any]:
        repeats = seen.get(current, 0)
        seen[current] = repeats + 1
        if repeats:
            key = f"{unit['prefix']}/{current}#repeat{repeats}"
            return rejected(key, f"{unit['uri']}#{current}", "ingest", "repeated_key",
                            f"members of {current!r} are not adjacent in the tar")
        return _tar_sample(unit, current, parts)

    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _split_member(member.name)
            if member_key != current and current is not None:
                yield finish()
                parts = {}
            current = member_key
            parts[ext] = tar.extractfile(member).read()
    if current is not None:
        yield finish()


# --------------------------------------------------------------------------------------------- parquet units
def read_unit_rows(unit: dict, columns: list[str] | None = None) -> pa.Table:
    """The rows of a parquet unit: its row groups, sliced to [offset, offset + count)."""
    fs, path = storage.resolve(unit["uri"])
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_groups(list(unit["row_groups"]), columns=columns)
    return table.slice(int(unit["offset"]), int(unit["count"]))


def _pick(names: list[str], candidates: tuple[str, ...], configured: str | None, what: str, uri: str) -> str | None:
    if configured:
        if configured not in names:
            raise ValueError(f"{what} column {configured!r} is not in {uri} (columns: {names})")
        return configured
    return next((c for c in candidates if c in names), None)


def read_parquet_unit(unit: dict, image_column: str | None = None,
                      caption_column: str | None = None) -> Iterator[dict[str, Any]]:
    table = read_unit_rows(unit)
    names = table.column_names
    image_col = _pick(names, IMAGE_COLUMNS, image_column, "ingest.image_column", unit["uri"])
    if image_col is None:
        raise ValueError(f"{unit['uri']} has no image column (looked for {IMAGE_COLUMNS}; set ingest.image_column)")
    caption_col = _pick(names, CAPTION_COLUMNS, caption_column, "ingest.caption_column", unit["uri"])
    for offset, row in enumerate(table.to_pylist()):
        row_index = int(unit["start"]) + offset
        raw_key = row.get("key")  # kept in meta: a key column need not be unique across files, the row index is
        key = f"{unit['prefix']}{row_index:09d}"
        source = row.get("url") or f"{unit['uri']}#{row_index}"
        image = row.get(image_col)
        if isinstance(image, dict):  # Hugging Face image struct {"bytes", "path"}
            image = image.get("bytes")
        status = row.get("status")
        if status is not None and status != "success":
            yield rejected(key, source, "ingest", "download_failed", row.get("error_message") or status)
            continue
        if image is None:
            yield rejected(key, source, "ingest", "missing_image", f"{image_col} is null")
            continue
        columns = {k: v for k, v in row.items()
                   if k not in (image_col, caption_col, "key") and not isinstance(v, (bytes, bytearray))}
        yield {"key": key, "image": image, "caption_raw": row.get(caption_col) if caption_col else None,
               "source": source, "meta": {"columns": columns, "source_key": raw_key}}
