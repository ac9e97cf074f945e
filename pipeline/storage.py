"""Paths under `paths.root`, local or object storage, through pyarrow filesystems.

Every write here is atomic: local files are written to a temporary name in the same folder and renamed; on object
stores a PUT is all-or-nothing, so an interrupted write leaves no object behind. Readers can therefore take any
existing file as complete.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sdxl.checkpoint import write_bytes_atomic_local

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")


def is_remote(uri: str) -> bool:
    return str(uri).startswith(_REMOTE_SCHEMES)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI with `/`."""
    base = str(base)
    if is_remote(base) or base.startswith("file://"):
        return posixpath.join(base, *[str(p).strip("/") for p in parts])
    return os.path.join(base, *[str(p) for p in parts])


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path-in-filesystem) for a local path or URI."""
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of files under a folder whose names end with ``suffix``; [] when the folder is missing.

    Temporary files of unfinished atomic writes (``.tmp-`` prefix) are never listed.
    """
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    base = str(uri).rstrip("/")
    out = []
    for info in infos:
        name = posixpath.basename(info.path)
        if info.type != pafs.FileType.File or name.startswith(".tmp-") or not name.endswith(suffix):
            continue
        rel = posixpath.relpath(info.path, path.rstrip("/")) if recursive else name
        out.append(join(base, *rel.split("/")))
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        # Temp file beside the target, fsync, rename: the model core's writer (it cannot import this module).
        write_bytes_atomic_local(path, data)
    else:
        # An object store makes a PUT visible only when it completes, and needs no parent "folders" (creating them
        # would only add marker objects and requests).
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def write_parquet_atomic(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(uri, buf.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def remove(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
