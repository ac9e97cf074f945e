"""Reading ingest sources: image headers, folder listings, WebDataset tars and parquet files with image bytes.

Readers return *raw samples*: dicts with key, image (bytes or None), caption_raw (bytes/str/None), source, meta
(dict), plus rejects for inputs that hold no image at all. `stages/data/ingest.py` turns raw samples into rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline import storage
from stages.data import records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "jpeg", "img", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "txt", "text")
# EXIF orientations 5-8 rotate by 90° or 270°: the displayed image has height and width swapped.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


# --------------------------------------------------------------------------------------------- image headers
@contextlib.contextmanager
def pil_strict_and_unbounded() -> Iterator[None]:
    """PIL with its decompression-bomb check off (we check `filter.max_pixels` ourselves, from the header) and with
    truncated files raising instead of being padded with grey."""
    old_max, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_max, old_truncated


@dataclass(frozen=True)
class ImageHeader:
    format: str | None
    height: int | None  # displayed (EXIF-corrected) height
    width: int | None
    orientation: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def probe_image(data: bytes | None) -> ImageHeader:
    """Format and EXIF-corrected size from the header only (`Image.open` is lazy: no pixel is decoded)."""
    if not data:
        return ImageHeader(None, None, None, 1, "empty payload")
    with pil_strict_and_unbounded():
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                try:
                    orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
                except Exception:  # a broken EXIF block does not make the image unusable
                    orientation = 1
                fmt = img.format
        except UnidentifiedImageError:
            return ImageHeader(None, None, None, 1, "PIL cannot identify the image format")
        except (OSError, ValueError, SyntaxError) as err:
            return ImageHeader(None, None, None, 1, f"{type(err).__name__}: {err}")
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(fmt, int(height), int(width), orientation)


_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
)


def sniff_payload(data: bytes | None) -> str:
    """A coarse label for a payload: an image format name by magic bytes, 'empty', 'html', 'text' or 'binary'."""
    if not data:
        return "empty"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    head = data[:1024].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "html"
    try:
        data[:4096].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


IMAGE_MAGIC_LABELS = {"jpeg", "png", "gif", "bmp", "tiff", "webp"}


# --------------------------------------------------------------------------------------------- source kinds
def detect_source_kind(source: str, source_type: str = "auto") -> str:
    """One of folder | urls | webdataset | parquet for ``ingest.source``."""
    kinds = ("folder", "urls", "webdataset", "parquet")
    if source_type != "auto":
        if source_type not in kinds:
            raise ValueError(f"ingest.source_type must be auto or one of {kinds}, got {source_type!r}")
        return source_type
    if not storage.exists(source):
        raise FileNotFoundError(f"ingest.source does not exist: {source}")
    lower = source.lower()
    if storage.is_file(source):
        if lower.endswith((".csv", ".jsonl", ".json", ".tsv")):
            return "urls"
        if lower.endswith(".tar"):
            return "webdataset"
        if lower.endswith(".parquet"):
            return "urls" if _is_url_list(source) else "parquet"
        raise ValueError(f"ingest.source {source} is a file of unknown kind (expected .csv/.jsonl/.parquet/.tar)")
    files = storage.list_files(source, recursive=True)
    if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
        return "folder"
    if any(f.lower().endswith(".tar") for f in files):
        return "webdataset"
    parquets = [f for f in files if f.lower().endswith(".parquet")]
    if parquets:
        return "urls" if _is_url_list(parquets[0]) else "parquet"
    raise ValueError(f"ingest.source {source} holds no images, .tar shards or .parquet files")


def _is_url_list(parquet_uri: str) -> bool:
    names = set(_parquet_schema(parquet_uri).names)
    return "url" in names and not names.intersection(IMAGE_COLUMNS)


def _parquet_schema(uri: str) -> pa.Schema:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).schema_arrow


def relative(uri: str, base: str) -> str:
    base = str(base).rstrip("/").rstrip("\\")
    rel = str(uri)[len(base):].lstrip("/").lstrip("\\")
    return rel.replace("\\", "/")


def strip_extension(rel: str) -> str:
    head, tail = posixpath.split(rel)
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return posixpath.join(head, stem) if head else stem


# --------------------------------------------------------------------------------------------- folder source
def plan_folder(source: str, chunk_size: int, extensions: tuple[str, ...]) -> tuple[list[dict], int]:
    """Chunks of ``{"rel", "key", "txt", "json"}`` items over the sorted image files; also the count of files that
    are neither images nor sidecars (reported, not ingested)."""
    files = [relative(f, source) for f in storage.list_files(source, recursive=True)]
    present = set(files)
    images = [f for f in files if f.lower().endswith(extensions)]
    sidecars = {strip_extension(f) + ext for f in images for ext in (".txt", ".json")}
    ignored = sum(1 for f in files if f not in sidecars and not f.lower().endswith(extensions))
    items, used_keys = [], set()
    for rel in images:  # sorted: the first file of a colliding stem keeps the short key
        stem = strip_extension(rel)
        key = stem if stem not in used_keys else rel
        used_keys.add(key)
        items.append({"rel": rel, "key": key, "key_collision": key != stem,
                      "txt": stem + ".txt" if stem + ".txt" in present else None,
                      "json": stem + ".json" if stem + ".json" in present else None})
    return _split(items, chunk_size, {"kind": "folder", "root": source}), ignored


def _split(items: list[dict], chunk_size: int, common: dict) -> list[dict]:
    if chunk_size < 1:
        raise ValueError(f"ingest.chunk_size must be >= 1, got {chunk_size}")
    return [{"index": i, **common, "items": items[start:start + chunk_size]}
            for i, start in enumerate(range(0, len(items), chunk_size))]


def read_folder_chunk(chunk: dict) -> Iterator[dict[str, Any]]:
    root = chunk["root"]
    for item in chunk["items"]:
        uri = storage.join(root, *item["rel"].split("/"))
        meta: dict[str, Any] = {}
        if item.get("key_collision"):
            meta["flags"] = ["key_collision"]
        caption_raw = storage.read_bytes(storage.join(root, *item["txt"].split("/"))) if item["txt"] else None
        if item["json"]:
            sidecar_raw = storage.read_bytes(storage.join(root, *item["json"].split("/")))
            try:
                meta["sidecar"] = json.loads(sidecar_raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                meta.setdefault("flags", []).append("sidecar_invalid")
                meta["sidecar_error"] = str(err)
        yield {"key": item["key"], "image": storage.read_bytes(uri), "caption_raw": caption_raw, "source": uri,
               "meta": meta}


# --------------------------------------------------------------------------------------------- webdataset tars
def plan_tars(source: str) -> list[dict]:
    tars = [source] if storage.is_file(source) else [f for f in storage.list_files(source, recursive=True)
                                                     if f.lower().endswith(".tar")]
    base = posixpath.dirname(source) if storage.is_file(source) else source
    return [{"index": i, "kind": "webdataset", "uri": uri, "prefix": strip_extension(relative(uri, base))}
            for i, uri in enumerate(tars)]


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    head, tail = posixpath.split(name)
    stem, _, ext = tail.partition(".")
    return (posixpath.join(head, stem) if head else stem), ext.lower()


def read_tar_chunk(chunk: dict) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    groups: dict[str, dict[str, bytes]] = {}
    fs, path = storage.resolve(chunk["uri"])
    # Stream mode ("r|"): members are read in order, the tar never sits in memory as a whole.
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = _split_member(member.name)
            groups.setdefault(member_key, {})[ext] = tar.extractfile(member).read()
    samples, rejects = [], []
    for member_key in sorted(groups):
        parts = groups[member_key]
        key = f"{chunk['prefix']}/{member_key}"
        image_ext = next((e for e in sorted(parts) if "." + e in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            rejects.append(records.reject_row(key, "ingest", "missing_image",
                                              f"tar members {sorted(parts)} hold no image"))
            continue
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
        samples.append({"key": key, "image": parts[image_ext], "caption_raw": caption_raw,
                        "source": f"{chunk['uri']}#{member_key}.{image_ext}", "meta": meta})
    return samples, rejects


# --------------------------------------------------------------------------------------------- parquet files
def _row_group_sizes(uri: str) -> list[int]:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def plan_parquet(source: str, chunk_size: int, keys_from_column: bool = False) -> list[dict]:
    """Chunks of whole row groups (about ``chunk_size`` rows each), so a chunk reads only its own rows."""
    if chunk_size < 1:
        raise ValueError(f"ingest.chunk_size must be >= 1, got {chunk_size}")
    files = [source] if storage.is_file(source) else [f for f in storage.list_files(source, recursive=True)
                                                      if f.lower().endswith(".parquet")]
    base = posixpath.dirname(source) if storage.is_file(source) else source
    plan: list[dict] = []
    for uri in files:
        prefix = "" if keys_from_column else strip_extension(relative(uri, base)) + "/"
        groups: list[int] = []
        rows, start = 0, 0
        for group, size in enumerate(_row_group_sizes(uri)):
            groups.append(group)
            rows += size
            if rows >= chunk_size:
                plan.append({"index": len(plan), "kind": "parquet", "uri": uri, "prefix": prefix,
                             "row_groups": groups, "start": start})
                groups, start, rows = [], start + rows, 0
        if groups and rows:
            plan.append({"index": len(plan), "kind": "parquet", "uri": uri, "prefix": prefix,
                         "row_groups": groups, "start": start})
    return plan


def _pick(names: list[str], candidates: tuple[str, ...], configured: str | None, what: str, uri: str) -> str | None:
    if configured:
        if configured not in names:
            raise ValueError(f"{what} column {configured!r} is not in {uri} (columns: {names})")
        return configured
    return next((c for c in candidates if c in names), None)


def read_parquet_chunk(chunk: dict, image_column: str | None = None,
                       caption_column: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    table = records.read_row_groups(chunk["uri"], chunk["row_groups"])
    names = table.column_names
    image_col = _pick(names, IMAGE_COLUMNS, image_column, "ingest.image_column", chunk["uri"])
    if image_col is None:
        raise ValueError(f"{chunk['uri']} has no image column (looked for {IMAGE_COLUMNS}; set ingest.image_column)")
    caption_col = _pick(names, CAPTION_COLUMNS, caption_column, "ingest.caption_column", chunk["uri"])
    rows = table.to_pylist()
    samples, rejects = [], []
    for offset, row in enumerate(rows):
        row_index = chunk["start"] + offset
        raw_key = row.get("key")
        key = f"{chunk['prefix']}{raw_key if raw_key not in (None, '') else f'{row_index:09d}'}"
        image = row.get(image_col)
        if isinstance(image, dict):  # Hugging Face image struct {"bytes", "path"}
            image = image.get("bytes")
        status = row.get("status")
        if status is not None and status != "success":
            rejects.append(records.reject_row(key, "ingest", "download_failed",
                                              row.get("error_message") or status))
            continue
        if image is None:
            rejects.append(records.reject_row(key, "ingest", "missing_image", f"{image_col} is null"))
            continue
        columns = {k: v for k, v in row.items()
                   if k not in (image_col, caption_col, "key") and not isinstance(v, (bytes, bytearray))}
        samples.append({"key": key, "image": image, "caption_raw": row.get(caption_col) if caption_col else None,
                        "source": row.get("url") or f"{chunk['uri']}#{row_index}",
                        "meta": {"columns": columns, "source_key": raw_key}})
    return samples, rejects


# --------------------------------------------------------------------------------------------- decoding
def to_rgb(img: Image.Image) -> Image.Image:
    """An upright RGB copy of a decoded image: EXIF rotation applied; palette, alpha (on white), CMYK and 16-bit
    modes converted."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bit by the value range, not by clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def decode_rgb(data: bytes, max_side: int | None = None) -> Image.Image:
    """Fully decode ``data`` to upright RGB, shrunk so its longer side is at most ``max_side`` (None: full size)."""
    with pil_strict_and_unbounded():
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = to_rgb(img)
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return rgb
