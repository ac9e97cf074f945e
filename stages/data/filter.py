"""Stage `filter`: reject what cannot be trained on, each rejection with its reason; never reject for being small.

Checks, in order (the first failing one is the recorded reason):
`not_an_image` (a payload PIL cannot identify that is not an image by its magic bytes: text, HTML) /
`undecodable` (empty, truncated or corrupt image data; a full decode is done) / `decompression_bomb` (header pixel
count above `filter.max_pixels`, checked before decoding) / `duplicate` (same sha256 as a sample whose key sorts first,
across all chunks) / `aspect_out_of_range` (h/w outside `filter.min_aspect..max_aspect` with `out_of_range=reject`) /
score thresholds (`low_clip_score`, `low_aesthetic_score`, `high_watermark_prob`, `high_nsfw_prob`) when a scorer is
configured (`scoring_failed` when the scorer raises on an image). Score columns stay null without a scorer.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pipeline import storage
from pipeline.context import StageContext
from stages.data import records, runner, sources

log = logging.getLogger(__name__)
STAGE = "filter"
DUPLICATES_NAME = "_duplicates.parquet"
HASHES_DIR = "_hashes"
OUT_OF_RANGE_MODES = ("reject", "clamp")


@dataclass(frozen=True)
class FilterOptions:
    max_pixels: int = 178_956_970
    min_aspect: float = 0.25
    max_aspect: float = 4.0
    out_of_range: str = "reject"
    min_clip_score: float | None = None
    min_aesthetic: float | None = None
    max_watermark: float | None = None
    max_nsfw: float | None = None
    score_batch_size: int = 16
    score_max_side: int = 512

    def __post_init__(self) -> None:
        if self.out_of_range not in OUT_OF_RANGE_MODES:
            raise ValueError(f"filter.out_of_range must be one of {OUT_OF_RANGE_MODES}, got {self.out_of_range!r}")
        if not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError(f"filter.min_aspect..max_aspect must satisfy 0 < min <= max, "
                             f"got {self.min_aspect}..{self.max_aspect}")
        if self.max_pixels <= 0:
            raise ValueError(f"filter.max_pixels must be positive, got {self.max_pixels}")


# (score column, option name, reason, True when a value *below* the threshold fails)
THRESHOLDS = (
    ("clip_score", "min_clip_score", "low_clip_score", True),
    ("aesthetic_score", "min_aesthetic", "low_aesthetic_score", True),
    ("watermark_prob", "max_watermark", "high_watermark_prob", False),
    ("nsfw_prob", "max_nsfw", "high_nsfw_prob", False),
)


# --------------------------------------------------------------------------------------------- pure core
def sha256_hex(data: bytes | None) -> str:
    return hashlib.sha256(data or b"").hexdigest()


def find_duplicates(keys: list[str], hashes: list[str]) -> dict[str, str]:
    """{duplicate key: kept key}: per sha256 the key first in sort order is kept. Deterministic for any input order."""
    winner: dict[str, str] = {}
    for key, digest in sorted(zip(keys, hashes)):
        winner.setdefault(digest, key)
    return {key: winner[digest] for key, digest in zip(keys, hashes) if winner[digest] != key}


def check_image(data: bytes | None, max_pixels: int) -> tuple[sources.ImageHeader, str | None, str]:
    """(header, reject reason or None, detail) for the validity checks that need no other sample."""
    header = sources.probe_image(data)
    if not header.ok:
        label = sources.sniff_payload(data)
        if label == "empty" or label in sources.IMAGE_MAGIC_LABELS:
            return header, "undecodable", f"{label}: {header.error}"
        return header, "not_an_image", f"payload looks like {label}"
    if header.height <= 0 or header.width <= 0:
        return header, "undecodable", f"header declares an empty image ({header.width}x{header.height})"
    pixels = header.height * header.width
    if pixels > max_pixels:
        return header, "decompression_bomb", f"{header.width}x{header.height} = {pixels} pixels > {max_pixels}"
    try:
        with sources.pil_strict_and_unbounded(), Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as err:  # any decoder failure means the bytes cannot be trained on
        return header, "undecodable", f"{type(err).__name__}: {err}"
    return header, None, ""


def threshold_reason(scores: dict[str, float | None], opts: FilterOptions) -> tuple[str | None, str]:
    for column, option, reason, below_fails in THRESHOLDS:
        limit, value = getattr(opts, option), scores.get(column)
        if limit is None or value is None or np.isnan(value):
            continue
        if (value < limit) if below_fails else (value > limit):
            return reason, f"{column}={value:.4f} {'<' if below_fails else '>'} {option}={limit}"
    return None, ""


def filter_table(table: pa.Table, opts: FilterOptions, duplicates: dict[str, str],
                 scorer: Any = None) -> tuple[pa.Table, pa.Table]:
    """(kept rows in the filter schema, rejects) for one ingest part."""
    rejects: list[dict[str, str]] = []
    survivors: list[dict[str, Any]] = []
    for row in table.to_pylist():
        key, data = row["key"], row["image"]
        header, reason, detail = check_image(data, opts.max_pixels)
        if reason is None and key in duplicates:
            reason, detail = "duplicate", f"same bytes as {duplicates[key]}"
        if reason is None and not (opts.min_aspect <= header.height / header.width <= opts.max_aspect):
            if opts.out_of_range == "reject":
                reason = "aspect_out_of_range"
                detail = f"h/w={header.height / header.width:.3f} outside {opts.min_aspect}..{opts.max_aspect}"
            else:
                meta = records.load_meta(row["meta_json"])
                meta.setdefault("flags", []).append("aspect_clamped")
                row["meta_json"] = records.dump_meta(meta)
        if reason is not None:
            rejects.append(records.reject_row(key, STAGE, reason, detail))
            continue
        row.update(sha256=sha256_hex(data), orig_h=header.height, orig_w=header.width, format=header.format)
        survivors.append(row)
    kept = _score_and_threshold(survivors, opts, scorer, rejects) if scorer is not None else survivors
    return records.table_from_rows(kept, records.FILTER_SCHEMA), records.rejects_table(rejects)


def _score_batch(scorer: Any, images: list, captions: list[str]) -> list[dict[str, float] | Exception]:
    """Per-image score dicts; when the batch call fails, each image is scored alone so only the culprit fails."""
    def unpack(scores: dict, n: int) -> list[dict[str, float]]:
        arrays = {name: np.asarray(scores[name], dtype=np.float64).reshape(-1) for name in records.SCORE_COLUMNS
                  if name in scores}
        if any(len(a) != n for a in arrays.values()):
            raise ValueError(f"scorer returned {[len(a) for a in arrays.values()]} scores for {n} images")
        return [{name: float(a[i]) for name, a in arrays.items()} for i in range(n)]

    try:
        return unpack(scorer.score(images, captions), len(images))
    except Exception:
        out: list[dict[str, float] | Exception] = []
        for image, caption in zip(images, captions):
            try:
                out.append(unpack(scorer.score([image], [caption]), 1)[0])
            except Exception as err:  # recorded as a reject with the error, never a crashed stage
                out.append(err)
        return out


def _score_and_threshold(rows: list[dict[str, Any]], opts: FilterOptions, scorer: Any,
                         rejects: list[dict[str, str]]) -> list[dict[str, Any]]:
    kept = []
    for start in range(0, len(rows), opts.score_batch_size):
        batch = rows[start:start + opts.score_batch_size]
        images = [sources.decode_rgb(r["image"], opts.score_max_side) for r in batch]
        for row, values in zip(batch, _score_batch(scorer, images, [r["caption"] for r in batch])):
            if isinstance(values, Exception):
                rejects.append(records.reject_row(row["key"], STAGE, "scoring_failed",
                                                  f"{type(values).__name__}: {values}"))
                continue
            row.update(values)
            reason, detail = threshold_reason(values, opts)
            if reason is None:
                kept.append(row)
            else:
                rejects.append(records.reject_row(row["key"], STAGE, reason, detail))
    return kept


# --------------------------------------------------------------------------------------------- Ray wrappers
class HashWorker(runner.ChunkWorker):
    """Dedup pass: (key, sha256) of every sample of one ingest part."""

    def process(self, chunk: dict[str, Any]) -> tuple[pa.Table, None]:
        table = storage.read_parquet(chunk["input"], columns=["key", "image"])
        digests = [sha256_hex(b) for b in table.column("image").to_pylist()]
        return pa.table({"key": table.column("key").cast(pa.string()), "sha256": pa.array(digests, pa.string())}), None


def build_scorer(scoring_cfg: Any) -> Any:
    """The configured image-text scorer, or None when the section is absent or `scoring.enabled` is false
    (`ImageTextScorer.from_config` may also return None when no score model is configured)."""
    if scoring_cfg is None or not scoring_cfg.get("enabled", True):
        return None
    from stages.data.scorers import ImageTextScorer

    return ImageTextScorer.from_config(scoring_cfg)


class FilterWorker(runner.ChunkWorker):
    def __init__(self, stage_dir: str, options: dict, duplicates_uri: str, scoring: dict | None):
        super().__init__(stage_dir)
        self.opts = FilterOptions(**options)
        dup = storage.read_parquet(duplicates_uri)
        self.duplicates = dict(zip(dup.column("key").to_pylist(), dup.column("winner").to_pylist()))
        self.scorer = build_scorer(OmegaConf.create(scoring) if scoring is not None else None)

    def process(self, chunk: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
        return filter_table(storage.read_parquet(chunk["input"]), self.opts, self.duplicates, self.scorer)


def options_from_config(fcfg: Any) -> dict[str, Any]:
    """The FilterOptions fields present in the `filter` section (null thresholds stay null: off)."""
    container = OmegaConf.to_container(fcfg, resolve=True) if isinstance(fcfg, DictConfig) else dict(fcfg)
    return {k: container[k] for k in FilterOptions.__dataclass_fields__ if k in container}


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    fcfg = cfg.filter
    ingest_dir, stage_dir = runner.absolute(ctx.stage_dir("ingest")), runner.absolute(ctx.stage_dir(STAGE))
    runner.require_success(ingest_dir, "ingest")
    options = options_from_config(fcfg)
    FilterOptions(**options)  # a bad value fails here, naming the key, before Ray starts
    resources = runner.Resources.from_config(fcfg)

    hashes_dir = storage.join(stage_dir, HASHES_DIR)
    runner.run_stage("filter_hashes", hashes_dir, runner.previous_parts_plan(ingest_dir), HashWorker, {},
                     runner.Resources(concurrency=resources.concurrency, num_cpus=resources.num_cpus))
    duplicates_uri = storage.join(stage_dir, DUPLICATES_NAME)
    if not storage.exists(duplicates_uri):
        hashes = records.read_tables(records.list_parts(hashes_dir),
                                     pa.schema([("key", pa.string()), ("sha256", pa.string())]))
        dup = find_duplicates(hashes.column("key").to_pylist(), hashes.column("sha256").to_pylist())
        storage.write_parquet_atomic(
            pa.table({"key": pa.array(sorted(dup), pa.string()),
                      "winner": pa.array([dup[k] for k in sorted(dup)], pa.string())}), duplicates_uri)

    scoring = cfg.get("scoring")
    worker_options = {"options": options, "duplicates_uri": duplicates_uri,
                      "scoring": OmegaConf.to_container(scoring, resolve=True) if scoring is not None else None}
    counts = runner.run_stage(STAGE, stage_dir, runner.previous_parts_plan(ingest_dir), FilterWorker,
                              worker_options, resources)
    ctx.log_metrics({f"{STAGE}/kept": counts["kept"], f"{STAGE}/rejected": counts["rejected"]})
    log.info("filter: %s", counts)
    return counts
