"""Stage `ingest`: read `ingest.source` into parquet parts of encoded images, captions and header sizes.

Sources: a folder of images with same-stem `.txt` captions (and optional `.json` sidecars), a URL list downloaded with
img2dataset, or existing WebDataset tars / parquet files with image bytes. Bytes are kept as they are; the header gives
the EXIF-corrected size without decoding pixels. Broken images are *not* judged here (the filter stage does that);
inputs with no image at all (failed downloads, tar groups without an image) become rejects.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig

from pipeline import storage
from pipeline.context import StageContext
from stages.data import records, runner, sources

log = logging.getLogger(__name__)
STAGE = "ingest"
SOURCE_INFO_NAME = "_source.json"


# --------------------------------------------------------------------------------------------- pure core
def normalize_caption(raw: bytes | str | None, max_chars: int) -> tuple[str, list[str]]:
    """(caption, flags): a missing caption becomes "" (flag `caption_missing`), invalid UTF-8 is decoded with
    replacement characters (flag `caption_invalid_utf8`), long captions are cut to ``max_chars`` (`caption_truncated`)."""
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


def build_row(sample: dict[str, Any], max_caption_chars: int) -> dict[str, Any]:
    """A row of the ingest schema from a raw sample of `stages.data.sources`."""
    caption, flags = normalize_caption(sample.get("caption_raw"), max_caption_chars)
    header = sources.probe_image(sample["image"])
    meta = dict(sample.get("meta") or {})
    meta_flags = list(meta.pop("flags", [])) + flags
    if not header.ok:
        meta_flags.append("header_unreadable")
        meta["header_error"] = header.error
    if header.orientation != 1:
        meta["exif_orientation"] = header.orientation
    if meta_flags:
        meta["flags"] = meta_flags
    return {"key": sample["key"], "image": sample["image"], "caption": caption, "source": sample["source"],
            "orig_h": header.height, "orig_w": header.width, "format": header.format,
            "meta_json": records.dump_meta(meta)}


def ingest_chunk(chunk: dict[str, Any], max_caption_chars: int, image_column: str | None = None,
                 caption_column: str | None = None) -> tuple[pa.Table, pa.Table]:
    """Read one planned chunk: (rows in the ingest schema, rejects)."""
    kind = chunk["kind"]
    if kind == "folder":
        samples, rejects = list(sources.read_folder_chunk(chunk)), []
    elif kind == "webdataset":
        samples, rejects = sources.read_tar_chunk(chunk)
    elif kind == "parquet":
        samples, rejects = sources.read_parquet_chunk(chunk, image_column, caption_column)
    else:
        raise ValueError(f"unknown chunk kind {kind!r}")
    rows = [build_row(s, max_caption_chars) for s in samples]
    return records.table_from_rows(rows, records.INGEST_SCHEMA), records.rejects_table(rejects)


class IngestWorker(runner.ChunkWorker):
    def process(self, chunk: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
        return ingest_chunk(chunk, **self.options)


# --------------------------------------------------------------------------------------------- URL lists
_URL_LIST_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def url_list_columns(source: str, input_format: str) -> list[str]:
    """Column names of a URL list file (read from its header / first record)."""
    if input_format == "parquet":
        return list(sources._parquet_schema(source).names)
    text = storage.read_bytes(source).decode("utf-8", errors="replace")
    first = text.splitlines()[0] if text else ""
    if input_format in ("csv", "tsv"):
        import csv

        return next(csv.reader([first], delimiter="\t" if input_format == "tsv" else ","), [])
    if input_format == "jsonl":
        return list(json.loads(first).keys()) if first.strip() else []
    records_list = json.loads(text)
    return list(records_list[0].keys()) if records_list else []


def download_urls(source: str, download_dir: str, dl: DictConfig) -> str:
    """Download a URL list with img2dataset into ``download_dir`` (parquet output, bytes as served); returns it.

    A `_SUCCESS` marker makes a finished download a no-op on re-runs; an interrupted one resumes through
    img2dataset's incremental mode.
    """
    marker = storage.join(download_dir, records.SUCCESS_NAME)
    if storage.exists(marker):
        return download_dir
    if storage.is_file(source):
        suffix = "." + source.rsplit(".", 1)[-1].lower()
        first_file = source
    else:
        listed = [f for f in storage.list_files(source) if "." + f.rsplit(".", 1)[-1].lower() in _URL_LIST_FORMATS]
        if not listed:
            raise ValueError(f"ingest.source {source}: no URL list file (.csv/.tsv/.jsonl/.json/.parquet)")
        suffix, first_file = "." + listed[0].rsplit(".", 1)[-1].lower(), listed[0]
    if suffix not in _URL_LIST_FORMATS:
        raise ValueError(f"ingest.source {source}: URL lists must be csv/tsv/jsonl/json/parquet, got {suffix}")
    input_format = _URL_LIST_FORMATS[suffix]
    columns = url_list_columns(first_file, input_format)
    url_col, caption_col = dl.url_column, dl.caption_column
    if url_col not in columns:
        raise ValueError(f"URL list {first_file} has no {url_col!r} column (ingest.download.url_column); "
                         f"columns: {columns}")
    extra = [c for c in columns if c not in (url_col, caption_col)]
    from img2dataset import download

    storage.makedirs(download_dir)
    download(
        url_list=source,
        output_folder=download_dir,
        input_format=input_format,
        url_col=url_col,
        caption_col=caption_col if caption_col in columns else None,
        save_additional_columns=extra or None,
        output_format="parquet",
        resize_mode="no",
        disable_all_reencoding=True,
        processes_count=int(dl.processes),
        thread_count=int(dl.threads),
        timeout=int(dl.timeout_s),
        retries=int(dl.retries),
        number_sample_per_shard=int(dl.samples_per_shard),
        encode_format="jpg",
        extract_exif=False,
        compute_hash=None,
        enable_wandb=False,
        incremental_mode="incremental",
        distributor=str(dl.get("distributor", "multiprocessing")),
        user_agent_token=dl.get("user_agent_token"),
    )
    storage.write_json_atomic(marker, {"source": source})
    return download_dir


# --------------------------------------------------------------------------------------------- stage
def make_plan(cfg: DictConfig, ctx: StageContext) -> tuple[list[dict], dict[str, Any]]:
    """(chunks, extra counts) for `ingest.source`."""
    icfg = cfg.ingest
    if not icfg.get("source"):
        raise ValueError("ingest.source is not set: give a folder of images, a URL list or a folder of shards")
    source = runner.absolute(str(icfg.source))
    kind = sources.detect_source_kind(source, str(icfg.get("source_type", "auto")))
    chunk_size = int(icfg.chunk_size)
    extra: dict[str, Any] = {"source": source, "source_kind": kind}
    if kind == "folder":
        extensions = tuple(str(e).lower() for e in icfg.get("image_extensions", sources.IMAGE_EXTENSIONS))
        plan, ignored = sources.plan_folder(source, chunk_size, extensions)
        extra["ignored_files"] = ignored
        if ignored:
            log.warning("ingest: %d files in %s are neither images %s nor caption/sidecar files; not ingested",
                        ignored, source, extensions)
    elif kind == "urls":
        download_dir = download_urls(source, runner.absolute(storage.join(ctx.dataset_dir, "download")),
                                    icfg.download)
        plan = sources.plan_parquet(download_dir, chunk_size, keys_from_column=True)
    elif kind == "webdataset":
        plan = sources.plan_tars(source)
    else:
        plan = sources.plan_parquet(source, chunk_size)
    return plan, extra


def _check_same_source(stage_dir: str, source: str) -> dict[str, Any]:
    """The recorded source info of an earlier (maybe unfinished) run; an error when it read another source, because
    resuming would then mix two datasets."""
    info_uri = storage.join(stage_dir, SOURCE_INFO_NAME)
    if not storage.exists(info_uri):
        return {}
    info = storage.read_json(info_uri)
    if info.get("source") != source:
        raise ValueError(f"{stage_dir} was ingested from {info.get('source')!r}, not ingest.source={source!r}: "
                         f"choose another data.name or delete {storage.join(stage_dir, '..')}")
    return info


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    icfg = cfg.ingest
    stage_dir = runner.absolute(ctx.stage_dir(STAGE))
    if not icfg.get("source"):
        raise ValueError("ingest.source is not set: give a folder of images, a URL list or a folder of shards")
    extra = _check_same_source(stage_dir, runner.absolute(str(icfg.source)))

    def plan() -> list[dict]:
        chunks, info = make_plan(cfg, ctx)
        storage.write_json_atomic(storage.join(stage_dir, SOURCE_INFO_NAME), info)
        extra.update(info)
        return chunks

    options = {"max_caption_chars": int(icfg.max_caption_chars), "image_column": icfg.get("image_column"),
               "caption_column": icfg.get("caption_column")}
    counts = runner.run_stage(STAGE, stage_dir, plan, IngestWorker, options, runner.Resources.from_config(icfg),
                              extra)
    ctx.log_metrics({f"{STAGE}/kept": counts["kept"], f"{STAGE}/rejected": counts["rejected"]})
    log.info("ingest: %s", counts)
    return counts
