"""The per-sample work of the streaming pass, as a pure core: raw samples of one unit in, one sample table out.

For each input: caption normalisation, one open of the bytes (format, EXIF-corrected size, pixel budget, decode
check: stages/data/images.py), sha256, the aspect check, the nearest App. I bucket, and a re-encode only when the
format cannot go into a WebDataset tar as is or the image exceeds `buckets.max_side`. Exact duplicates *within* the
unit are rejected here (the key first in sort order stays); duplicates across units are found afterwards on the
metadata (stages/data/finalize.py). Rejected inputs stay in the table, without bytes, with their stage, reason and
detail, so every input of a unit reaches the shard writer and is accounted for there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa

from sdxl.buckets import bucket_table, nearest_bucket
from stages.data import images, records, unit_buffer

OUT_OF_RANGE_MODES = ("reject", "clamp")
TAR_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others → PNG


@dataclass(frozen=True)
class SampleOptions:
    max_caption_chars: int = 2000
    max_pixels: int = 178_956_970
    min_aspect: float = 0.25
    max_aspect: float = 4.0
    out_of_range: str = "reject"
    decode_check: str = "reduced"
    resolution: int = 1024
    multiple: int = 64
    max_side: int | None = None
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.out_of_range not in OUT_OF_RANGE_MODES:
            raise ValueError(f"filter.out_of_range must be one of {OUT_OF_RANGE_MODES}, got {self.out_of_range!r}")
        if not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError(f"filter.min_aspect..max_aspect must satisfy 0 < min <= max, "
                             f"got {self.min_aspect}..{self.max_aspect}")
        if self.max_pixels <= 0:
            raise ValueError(f"filter.max_pixels must be positive, got {self.max_pixels}")
        if self.decode_check not in images.DECODE_CHECKS:
            raise ValueError(f"filter.decode_check must be one of {images.DECODE_CHECKS}, got {self.decode_check!r}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"buckets.max_side must be null or >= 1, got {self.max_side}")
        bucket_table(self.resolution, self.multiple)  # a bad resolution / multiple fails here, named

    @classmethod
    def from_config(cls, cfg: Any) -> "SampleOptions":
        f, b = cfg.filter, cfg.buckets
        max_side = b.get("max_side")
        return cls(max_caption_chars=int(cfg.ingest.get("max_caption_chars", 2000)),
                   max_pixels=int(f.get("max_pixels", 178_956_970)), min_aspect=float(f.get("min_aspect", 0.25)),
                   max_aspect=float(f.get("max_aspect", 4.0)), out_of_range=str(f.get("out_of_range", "reject")),
                   decode_check=str(f.get("decode_check", "reduced")), resolution=int(b.resolution),
                   multiple=int(b.multiple), max_side=None if max_side is None else int(max_side),
                   jpeg_quality=int(b.get("jpeg_quality", 95)))


def sha256_hex(data: bytes | None) -> str:
    return hashlib.sha256(data or b"").hexdigest()


def normalize_caption(raw: bytes | str | None, max_chars: int) -> tuple[str, list[str]]:
    """(caption, flags): a missing caption becomes "" (flag `caption_missing`), invalid UTF-8 is decoded with
    replacement characters (flag `caption_invalid_utf8`), long captions are cut to ``max_chars``
    (`caption_truncated`)."""
    flags: list[str] = []
    if raw is None:
        return "", ["caption_missing"]
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            text = bytes(raw).decode("utf-8", errors="replace")
            flags.append("caption_invalid_utf8")
    else:
        text = str(raw)
    text = text.lstrip("\ufeff").strip()
    if not text:
        flags.append("caption_empty")
    if len(text) > max_chars:
        text = text[:max_chars]
        flags.append("caption_truncated")
    return text, flags


def find_duplicates(keys: list[str], hashes: list[str]) -> dict[str, str]:
    """{duplicate key: kept key}: per sha256 the key first in sort order is kept. Deterministic for any input order."""
    winner: dict[str, str] = {}
    for key, digest in sorted(zip(keys, hashes)):
        winner.setdefault(digest, key)
    return {key: winner[digest] for key, digest in zip(keys, hashes) if winner[digest] != key}


def reject(row: dict[str, Any], stage: str, reason: str, detail: str) -> dict[str, Any]:
    """Mark a sample row rejected (its bytes are dropped: nothing downstream needs them)."""
    row.update(image=None, reject_stage=stage, reject_reason=reason, reject_detail=str(detail)[:1000])
    return row


def process_sample(raw: dict[str, Any], unit: int, opts: SampleOptions,
                   table: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    """One sample row (SAMPLE_SCHEMA) from a raw sample of a source reader."""
    row: dict[str, Any] = {"key": raw["key"], "unit": unit, "source": raw.get("source"), "caption_synthetic": ""}
    if "reject" in raw:
        return reject(row, *raw["reject"])
    caption, flags = normalize_caption(raw.get("caption_raw"), opts.max_caption_chars)
    meta = dict(raw.get("meta") or {})
    flags = list(meta.pop("flags", [])) + flags
    data = raw["image"]
    header, reason, detail = images.check_image(data, opts.max_pixels, opts.decode_check)
    row.update(caption=caption, orig_h=header.height, orig_w=header.width, format=header.format)
    if reason is not None:
        return reject(row, "filter", reason, detail)
    aspect = header.height / header.width
    if not opts.min_aspect <= aspect <= opts.max_aspect:
        if opts.out_of_range == "reject":
            return reject(row, "filter", "aspect_out_of_range",
                          f"h/w={aspect:.3f} outside {opts.min_aspect}..{opts.max_aspect}")
        flags.append("aspect_clamped")
    if header.orientation != 1:
        meta["exif_orientation"] = header.orientation
    row["sha256"] = sha256_hex(data)
    row["bucket_h"], row["bucket_w"] = nearest_bucket(header.height, header.width, table)
    too_big = opts.max_side is not None and max(header.height, header.width) > opts.max_side
    if too_big or header.format not in TAR_FORMATS:
        try:
            data, new_format = images.reencode(data, header.format, opts.max_side if too_big else None,
                                               opts.jpeg_quality)
        except Exception as err:  # it decoded above, so this is rare: record it, do not crash
            return reject(row, "buckets", "reencode_failed", f"{type(err).__name__}: {err}")
        meta["reencoded"] = {"from_format": header.format, "to_format": new_format, "downscaled": too_big}
        row["format"] = new_format
    if flags:
        meta["flags"] = flags
    row["image"], row["meta_json"] = data, records.dump_meta(meta)
    return row


def dedup_rows(rows: list[dict[str, Any]]) -> None:
    """Reject exact duplicates among kept rows (the key first in sort order stays), in place."""
    kept = [r for r in rows if r.get("reject_reason") is None]
    duplicates = find_duplicates([r["key"] for r in kept], [r["sha256"] for r in kept])
    for row in kept:
        if row["key"] in duplicates:
            reject(row, "filter", "duplicate", f"same bytes as {duplicates[row['key']]}")


def process_unit(raw_samples: Iterable[dict[str, Any]], unit: int, opts: SampleOptions) -> pa.Table:
    """The sample table of one unit: every input, sorted by key, duplicates within the unit rejected."""
    table = bucket_table(opts.resolution, opts.multiple)
    raws, rows = [], []
    for raw in raw_samples:  # as they arrive: a URL unit's checks run while its later downloads are in flight
        raws.append(raw)
        rows.append(process_sample(raw, unit, opts, table))
    dedup_rows(rows)
    order = sorted(range(len(rows)), key=lambda i: rows[i]["key"])
    rows, raws = [rows[i] for i in order], [raws[i] for i in order]
    shared = unit_buffer.image_column(rows, raws)
    if shared is None:
        return records.table_from_rows(rows, records.SAMPLE_SCHEMA)
    index = records.SAMPLE_SCHEMA.get_field_index("image")
    rest = records.table_from_rows(rows, records.SAMPLE_SCHEMA.remove(index))
    return rest.add_column(index, records.SAMPLE_SCHEMA.field(index), shared)


def rejects_of(table: pa.Table) -> pa.Table:
    """The rejects (key, stage, reason, detail) of a sample table."""
    rejected = table.filter(table.column("reject_reason").is_valid())
    return pa.table({"key": rejected.column("key"), "stage": rejected.column("reject_stage"),
                     "reason": rejected.column("reject_reason"),
                     "detail": rejected.column("reject_detail").fill_null("")}, schema=records.REJECT_SCHEMA)
