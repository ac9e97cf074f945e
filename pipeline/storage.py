"""Paths under `paths.root`, local or object storage, through pyarrow filesystems.

Every write here is atomic: local files are written to a temporary name in the same folder and renamed; on object
stores a PUT is all-or-nothing, so an interrupted write leaves no object behind. Readers can therefore take any
existing file as complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import tempfile
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# No torch here (nor anything that imports it): every data-stage process imports this module, and torch costs
# seconds and ~0.7 GB per process.
from sdxl.atomic_files import open_atomic_local

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
    return sorted(uri for uri, _ in list_sizes(uri, suffix, recursive))


def list_sizes(uri: str, suffix: str = "", recursive: bool = False) -> list[tuple[str, int]]:
    """(URI, size in bytes) of the files :func:`list_files` lists, from the same single listing."""
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
        out.append((join(base, *rel.split("/")), int(info.size or 0)))
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


@contextlib.contextmanager
def open_atomic(uri: str) -> Iterator[BinaryIO]:
    """A binary stream whose content appears at ``uri`` only once the block exits without an error.

    Local: a temp file beside the target (``.tmp-`` prefix, never listed), fsync, then rename. Object stores: a local
    spool file, uploaded when the block ends (a store makes an upload visible only when it completes, and an error
    inside the block uploads nothing); no parent "folders" are made (they would only add marker objects and requests).
    """
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        with tempfile.TemporaryFile() as spool:
            yield spool
            spool.seek(0)
            with fs.open_output_stream(path) as out:
                while chunk := spool.read(1 << 24):
                    out.write(chunk)
        return
    with open_atomic_local(path) as stream:
        yield stream


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        with open_atomic(uri) as stream:
            stream.write(data)
    else:  # the bytes are all here: one upload, visible only once complete
        with fs.open_output_stream(path) as stream:
            stream.write(data)


def read_range(uri: str, offset: int, size: int) -> bytes:
    """``size`` bytes of a file from ``offset`` (one ranged read on object stores)."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return f.read_at(size, offset)


def list_entries(uri: str) -> tuple[list[tuple[str, int]], list[str]]:
    """One folder level: ([(file name, size)], [sub-folder names]), each sorted; temp files are left out. A listing
    per folder keeps memory to one folder's entries, however large the tree."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return [], []
    files, folders = [], []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = posixpath.basename(info.path.rstrip("/"))
        if info.type == pafs.FileType.Directory:
            folders.append(name)
        elif info.type == pafs.FileType.File and not name.startswith(".tmp-"):
            files.append((name, int(info.size or 0)))
    return sorted(files), sorted(folders)


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


def move(src: str, dst: str) -> None:
    """Move a file or folder to ``dst`` (which must not exist). Local: one rename. Object stores have no rename:
    each object is copied on the server, then the source objects are deleted, so an interrupted move leaves every
    object in at least one of the two places."""
    fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if type(fs) is not type(dst_fs):
        raise ValueError(f"cannot move {src} to {dst}: another filesystem")
    if dst_fs.get_file_info(dst_path).type != pafs.FileType.NotFound:
        raise FileExistsError(f"cannot move {src} to {dst}: the target exists")
    info = fs.get_file_info(src_path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"cannot move {src}: it does not exist")
    if not is_remote(src):
        fs.create_dir(posixpath.dirname(dst_path.rstrip("/")), recursive=True)
        fs.move(src_path, dst_path)
        return
    if info.type == pafs.FileType.File:
        fs.copy_file(src_path, dst_path)
        fs.delete_file(src_path)
        return
    base = src_path.rstrip("/")
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if entry.type == pafs.FileType.File:
            fs.copy_file(entry.path, posixpath.join(dst_path, posixpath.relpath(entry.path, base)))
    fs.delete_dir(base)
