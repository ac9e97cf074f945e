"""Which samples a training stage uses, and in which bucket each one trains: manifest reading and subset selection.

Pure pandas over the data stages' *current* manifest (docs/architecture.md, "Data contracts"): the base
``manifest.parquet`` (a folder of parquet parts, or a single file) with the metadata layers of later passes applied
(re-scores, re-captions: their columns joined by sample key, their rejects dropped; stages/data/layers.py). No I/O
besides reading it, no Ray. Errors name the manifest and the offending parameter. ``shard_index`` reads the data
stages' shard index: shards per bucket with their sample counts, to plan epochs without listing the shard objects.
"""

from __future__ import annotations

import ast
import math

import numpy as np
import pandas as pd

from pipeline import storage
from sdxl.buckets import bucket_table, nearest_bucket

MANIFEST_NAME = "manifest.parquet"
REQUIRED_COLUMNS = ("key", "shard", "bucket_h", "bucket_w")
DEFAULT_AESTHETIC_SCORE = 5.0  # used when the manifest has no aesthetic score for a sample

# Syntax a `loader.filter` expression may use: comparisons and boolean logic over manifest columns and literals.
_ALLOWED_NODES = (
    ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Invert,
    ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn,
    ast.BinOp, ast.BitAnd, ast.BitOr, ast.Name, ast.Load, ast.Constant, ast.List, ast.Tuple,
)


def dataset_dir_from_cfg(cfg) -> str:
    """``loader.dataset_dir`` when set, else ``<paths.root>/data/<data.name>``."""
    override = cfg.loader.get("dataset_dir") if "loader" in cfg else None
    if override:
        return str(override)
    return storage.join(str(cfg.paths.root), "data", str(cfg.data.name))


def latent_cache_dir(cfg) -> str:
    """``<dataset>/latents/<name>``: ``loader.cache_name``, else ``<preset>-<resolution>-<square|aspect>``.

    The name carries what changes the cached tensors' shapes (model preset, resolution, bucketing), so caches made
    for different stages sit side by side; per-bucket files go below it in ``<H>x<W>/`` folders.
    """
    lc = cfg.loader
    name = lc.get("cache_name")
    if not name:
        name = f"{cfg.model.preset}-{int(lc.resolution)}-{'aspect' if bool(lc.multi_aspect) else 'square'}"
    return storage.join(dataset_dir_from_cfg(cfg), "latents", str(name))


def read_manifest(dataset_dir: str) -> pd.DataFrame:
    """The current manifest as a DataFrame sorted by key; a clear error when it is missing, empty or malformed."""
    from stages.data.layers import current_manifest

    path = storage.join(dataset_dir, MANIFEST_NAME)
    if storage.is_file(path):  # a single file: written by tools and tests, or by older data stages
        df = storage.read_parquet(path).to_pandas()
    elif storage.exists(path):
        df = current_manifest(dataset_dir).to_pandas()
    else:
        raise FileNotFoundError(f"training data manifest not found: {path} (run the data stages first: "
                                f"`python pipeline/run.py stage=data`, or set loader.dataset_dir)")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest {path} lacks required column(s) {missing}; has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"manifest {path} has no samples")
    if df["key"].duplicated().any():
        dup = df.loc[df["key"].duplicated(), "key"].iloc[0]
        raise ValueError(f"manifest {path} has duplicate key {dup!r}")
    df = df.sort_values("key", kind="stable").reset_index(drop=True)
    df.attrs["path"] = path
    return df


def validate_filter_expression(expr: str, columns) -> None:
    """Reject anything but comparisons / boolean logic over known columns (no calls, attributes or subscripts)."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"loader.filter is not a valid expression: {expr!r} ({err.msg})") from None
    known = set(columns)
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise ValueError(f"loader.filter may only compare manifest columns with literals using "
                             f"==, !=, <, <=, >, >=, in, and/or/not; {type(node).__name__} is not allowed in {expr!r}")
        if isinstance(node, ast.Name) and node.id not in known:
            raise ValueError(f"loader.filter names unknown column {node.id!r}; manifest columns: {sorted(known)}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool)):
            raise ValueError(f"loader.filter literal {node.value!r} is not a number, string or bool")


def apply_filter(df: pd.DataFrame, expr: str | None) -> pd.DataFrame:
    """Rows where ``expr`` holds (null scores compare false); ``None`` / empty keeps every row."""
    if not expr:
        return df
    validate_filter_expression(expr, [c for c in df.columns if c != "meta_json"])
    names = {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}
    empty = sorted(n for n in names if df[n].isna().all())
    if empty:
        raise ValueError(f"loader.filter {expr!r} uses column(s) {empty} that have no values in "
                         f"{df.attrs.get('path', 'manifest')} (scores need scoring.enabled=true in the data stages); "
                         f"set loader.filter=null to train on every sample")
    out = df.query(expr, engine="python")
    if out.empty:
        raise ValueError(f"loader.filter {expr!r} keeps no sample of the {len(df)} in {df.attrs.get('path', 'manifest')}")
    return out


def select_top_fraction(df: pd.DataFrame, columns, fraction: float) -> pd.DataFrame:
    """The best ``fraction`` of rows by the mean percentile rank over ``columns`` (finetune_quality's curation).

    Averaging percentile ranks makes scores on different scales (aesthetic 1–10, CLIP cosine) weigh equally. A
    sample lacking a score ranks lowest on that column. Ties break by key, so the subset is deterministic.
    """
    where = df.attrs.get("path", "manifest")
    columns = list(columns)
    if not columns:
        raise ValueError("loader.top_k_by.columns must name at least one score column")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"loader.top_k_by.fraction must be in (0, 1], got {fraction}")
    for col in columns:
        if col not in df.columns:
            raise ValueError(f"loader.top_k_by column {col!r} is not in {where}; columns: {list(df.columns)}")
        if df[col].isna().all():
            raise ValueError(f"loader.top_k_by column {col!r} has no values in {where} "
                             f"(was its scorer configured in the filter stage?)")
    ranks = sum(df[col].rank(pct=True, method="average").fillna(0.0) for col in columns) / len(columns)
    keep = max(1, math.ceil(float(fraction) * len(df)))
    order = pd.DataFrame({"rank": ranks.to_numpy(), "key": df["key"].to_numpy()}).sort_values(
        ["rank", "key"], ascending=[False, True], kind="stable")
    out = df.iloc[np.sort(order.index.to_numpy()[:keep])]
    out.attrs.update(df.attrs)
    return out


def stage_buckets(df: pd.DataFrame, resolution: int, multiple: int, multi_aspect: bool,
                  require_table_match: bool) -> list[tuple[int, int]]:
    """The bucket each row trains in at this stage.

    Fixed-size stages train everything at ``resolution``²; multi-aspect stages map the manifest's bucket onto the
    stage's table (``bucket_table(resolution, multiple)``) by nearest aspect ratio. With ``require_table_match`` a
    manifest bucket outside the table is an error (the manifest was made for another resolution).
    """
    if not multi_aspect:
        return [(int(resolution), int(resolution))] * len(df)
    table = bucket_table(int(resolution), int(multiple))
    pairs = list(zip(df["bucket_h"].astype(int), df["bucket_w"].astype(int)))
    if require_table_match:
        foreign = sorted({p for p in pairs if p not in set(table)})
        if foreign:
            raise ValueError(
                f"manifest {df.attrs.get('path', 'manifest')} has buckets {[f'{h}x{w}' for h, w in foreign[:5]]} "
                f"that are not in the stage's table at loader.resolution={resolution} "
                f"(loader.bucket_multiple={multiple}); rebuild the shards at this resolution or set "
                f"loader.require_table_match=false to map by nearest aspect")
    mapped = {p: nearest_bucket(p[0], p[1], table) for p in set(pairs)}
    return [mapped[p] for p in pairs]


def select_samples(cfg, dataset_dir: str) -> pd.DataFrame:
    """Manifest rows the stage trains on (after ``loader.filter`` and ``loader.top_k_by``), sorted by key."""
    loader = cfg.loader
    df = read_manifest(dataset_dir)
    df = apply_filter(df, loader.get("filter"))
    top = loader.get("top_k_by")
    if top:
        df = select_top_fraction(df, top.get("columns", ()), float(top.get("fraction", 1.0)))
    return df.reset_index(drop=True).pipe(_keep_path, df.attrs.get("path"))


def _keep_path(df: pd.DataFrame, path: str | None) -> pd.DataFrame:
    df.attrs["path"] = path
    return df


def aesthetic_scores(df: pd.DataFrame) -> np.ndarray:
    """Per-row aesthetic score, ``DEFAULT_AESTHETIC_SCORE`` where missing."""
    if "aesthetic_score" not in df.columns:
        return np.full(len(df), DEFAULT_AESTHETIC_SCORE, dtype=np.float32)
    return df["aesthetic_score"].astype("float64").fillna(DEFAULT_AESTHETIC_SCORE).to_numpy(np.float32)


SHARD_INDEX_NAME = "shard_index.parquet"


def shard_index(dataset_dir: str) -> pd.DataFrame:
    """One row per shard: shard (relative path), bucket_h, bucket_w, samples (the manifest rows it holds), bytes.

    Written by the data stages from their own metadata, so planning an epoch over shards needs no object listing.
    """
    path = storage.join(dataset_dir, SHARD_INDEX_NAME)
    if not storage.exists(path):
        raise FileNotFoundError(f"shard index not found: {path} (written by `stage=data` / `stage=buckets`)")
    return storage.read_parquet(path).to_pandas().sort_values("shard", kind="stable").reset_index(drop=True)


def manifest_fingerprint(dataset_dir: str) -> str:
    """A content hash of the current manifest's files (base parts and finished layers), or "missing"."""
    import hashlib

    path = storage.join(dataset_dir, MANIFEST_NAME)
    if storage.is_file(path):
        files = [path]
    elif storage.exists(path):
        files = storage.list_files(path, suffix=".parquet")
        files += storage.list_files(storage.join(dataset_dir, "layers"), suffix=".parquet", recursive=True)
    else:
        return "missing"
    digest = hashlib.sha256()
    for uri in files:
        digest.update(uri[len(str(dataset_dir)):].encode())
        digest.update(storage.read_bytes(uri))
    return digest.hexdigest()
