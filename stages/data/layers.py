"""Metadata passes over a finished dataset: new columns keyed by sample key, never a rewritten shard.

`stage=filter` (a new scorer, other thresholds) and `stage=caption` (a new captioner) read the kept samples' bytes
from the shards by offset, run the model on Ray Data actors, and write a *layer*:
`layers/<nnn>-<stage>-<config digest>/part-<manifest part>-<chunk>.parquet` (key + the new columns) and
`rejects-....parquet` (threshold rejects). A layer with the same stage and config is resumed, not repeated.

The *current manifest* is the base `manifest.parquet` with the layers applied in order: a layer's columns replace
the base's for the keys it lists, its rejects leave the manifest (and join the rejects). Training reads it through
stages/train/data_manifest.py; `stats.json` is refreshed after each pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from stages.data import records, runner, summary

log = logging.getLogger(__name__)
LAYERS_DIR = "layers"
CHUNK_ROWS = 256  # samples per layer task


def layer_names(dataset_dir: str) -> list[str]:
    """Finished layers, in the order they apply."""
    root = storage.join(dataset_dir, LAYERS_DIR)
    return [name for name in storage.list_entries(root)[1]
            if storage.exists(storage.join(root, name, records.SUCCESS_NAME))]


def _layer_dir(dataset_dir: str, stage: str, digest: str) -> str:
    root = storage.join(dataset_dir, LAYERS_DIR)
    existing = storage.list_entries(root)[1]
    for name in existing:
        if name.endswith(f"-{stage}-{digest}"):
            return storage.join(root, name)
    return storage.join(root, f"{len(existing) + 1:03d}-{stage}-{digest}")


def _chunk_name(part: int, chunk: int, prefix: str = "part") -> str:
    return f"{prefix}-{part:06d}-{chunk:06d}.parquet"


def _layer_files(layer_dir: str, part: int, prefix: str) -> list[str]:
    return records.list_parts(layer_dir, f"{prefix}-{part:06d}-")


def apply_layers(dataset_dir: str, part: int, base: pa.Table, rejects: pa.Table,
                 names: list[str] | None = None) -> tuple[pa.Table, pa.Table]:
    """(current manifest rows, current rejects) of base manifest part ``part``, layers applied in order."""
    root = storage.join(dataset_dir, LAYERS_DIR)
    for name in layer_names(dataset_dir) if names is None else names:
        layer_dir = storage.join(root, name)
        dropped = records.read_tables(_layer_files(layer_dir, part, "rejects"), records.REJECT_SCHEMA)
        if dropped.num_rows:
            base = base.filter(pc.invert(pc.is_in(base.column("key"), dropped.column("key"))))
            rejects = pa.concat_tables([rejects, dropped])
        files = _layer_files(layer_dir, part, "part")
        if files:
            base = _replace_columns(base, pa.concat_tables([storage.read_parquet(f) for f in files]))
    return base, rejects


def _replace_columns(base: pa.Table, layer: pa.Table) -> pa.Table:
    """``base`` with the columns of ``layer`` (keyed by `key`) taking the layer's values where it has the key."""
    if layer.num_rows == 0 or base.num_rows == 0:
        return base
    position = pc.index_in(base.column("key"), value_set=layer.column("key"))
    has = pc.is_valid(position)
    for name in layer.column_names:
        if name == "key" or name not in base.column_names:
            continue
        taken = layer.column(name).take(position.fill_null(0)).cast(base.schema.field(name).type)
        base = base.set_column(base.schema.get_field_index(name), name,
                               pc.if_else(has, taken, base.column(name)))
    return base


def base_parts(dataset_dir: str) -> list[tuple[int, str, str]]:
    """(index, manifest part, rejects part) of the base dataset."""
    manifest = records.list_parts(storage.join(dataset_dir, records.MANIFEST_NAME))
    return [(records.part_index(uri), uri, storage.join(dataset_dir, records.REJECTS_NAME,
                                                        records.part_name(records.part_index(uri))))
            for uri in manifest]


def current_part(dataset_dir: str, index: int, manifest_uri: str, rejects_uri: str,
                 columns: list[str] | None = None) -> tuple[pa.Table, pa.Table]:
    base = records.read_tables([manifest_uri], records.MANIFEST_SCHEMA)
    rejects = records.read_tables([rejects_uri], records.REJECT_SCHEMA)
    base, rejects = apply_layers(dataset_dir, index, base, rejects)
    return (base.select(columns) if columns else base), rejects


def current_manifest(dataset_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The whole current manifest as one table (for consumers that hold it anyway, like the training loader)."""
    tables = [current_part(dataset_dir, i, m, r, columns)[0] for i, m, r in base_parts(dataset_dir)]
    if not tables:
        schema = records.MANIFEST_SCHEMA
        return (pa.schema([schema.field(c) for c in columns]) if columns else schema).empty_table()
    return pa.concat_tables(tables)


def _part_summary(job: tuple[int, str, str], dataset_dir: str) -> dict[str, Any]:
    return summary.part_summary(*current_part(dataset_dir, *job))


def current_summary(dataset_dir: str) -> dict[str, Any]:
    """The merged summary (stages/data/summary.py) of the current manifest and rejects."""
    total: dict[str, Any] = {}
    for part in runner.map_tasks(_part_summary, base_parts(dataset_dir), dataset_dir):
        summary.merge(total, part)
    return total


# --------------------------------------------------------------------------------------------- running a pass
def _digest(args: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read_chunk(batch: dict[str, Any], dataset_dir: str, layer_dir: str, columns: list[str]) -> pa.Table:
    """Ray Data task: one row group of a base manifest part, layers applied, as a sample table without bytes."""
    import pyarrow.parquet as pq

    index, group = int(batch["part"][0]), int(batch["group"][0])
    fs, path = storage.resolve(str(batch["manifest"][0]))
    with fs.open_input_file(path) as f:
        base = records.conform(pq.ParquetFile(f).read_row_group(group), records.MANIFEST_SCHEMA)
    rows, _ = apply_layers(dataset_dir, index, base, records.REJECT_SCHEMA.empty_table())
    n = rows.num_rows
    if n == 0:  # earlier layers rejected all of it: nothing travels on, the chunk is done as it is
        write_chunk(records.SAMPLE_SCHEMA.empty_table(), layer_dir, columns, (index, group))
    table = records.conform(rows, records.SAMPLE_SCHEMA)
    for name, values in (("unit", pa.array([index * 1_000_000 + group] * n, pa.int64())),
                         ("unit_size", pa.array([n] * n, pa.int32()))):
        table = table.set_column(table.schema.get_field_index(name), name, values)
    keep = [c for c in table.column_names if c != "image"]  # bytes are fetched by the model actor itself
    return table.select(keep).append_column("shard", rows.column("shard")).append_column(
        "image_offset", rows.column("image_offset")).append_column("image_size", rows.column("image_size"))


def with_images(table: pa.Table, dataset_dir: str) -> pa.Table:
    """``table`` plus the `image` bytes of its rows, read from the shards by offset (one open per shard)."""
    handles: dict[str, Any] = {}
    images = []
    try:
        for shard, at, size in zip(table.column("shard").to_pylist(), table.column("image_offset").to_pylist(),
                                   table.column("image_size").to_pylist()):
            if shard not in handles:
                fs, path = storage.resolve(storage.join(dataset_dir, *shard.split("/")))
                handles[shard] = fs.open_input_file(path)
            images.append(handles[shard].read_at(size, at))
    finally:
        for handle in handles.values():
            handle.close()
    return table.append_column("image", pa.array(images, pa.binary()))


class LayerActor:
    """A model actor of a metadata pass: fetches the block's bytes, runs the model core, drops the bytes again."""

    def __init__(self, actor_cls: type, actor_args: dict[str, Any], dataset_dir: str):
        self.model = actor_cls(**actor_args)
        self.dataset_dir = dataset_dir

    def __call__(self, table: pa.Table) -> pa.Table:
        out = self.model(records.conform(with_images(table, self.dataset_dir), records.SAMPLE_SCHEMA))
        return out.drop_columns(["image"])


def write_chunk(table: pa.Table, layer_dir: str, columns: list[str],
                chunk: tuple[int, int] | None = None) -> pa.Table:
    """Ray Data task: a chunk's layer rows (key + ``columns``) and rejects; the part is written last."""
    if chunk is None:
        if table.num_rows == 0:
            return pa.table({"rows": pa.array([], pa.int64())})
        if table.num_rows != int(table.column("unit_size")[0].as_py()):
            raise RuntimeError(f"layer chunk {table.column('unit')[0].as_py()} arrived split ({table.num_rows} "
                               f"of {table.column('unit_size')[0].as_py()} rows)")
        chunk = divmod(int(table.column("unit")[0].as_py()), 1_000_000)
    part, group = chunk
    rejected = table.filter(table.column("reject_reason").is_valid())
    kept = table.filter(table.column("reject_reason").is_null()).select(["key", *columns])
    rejects = pa.table({"key": rejected.column("key"), "stage": rejected.column("reject_stage"),
                        "reason": rejected.column("reject_reason"),
                        "detail": rejected.column("reject_detail").fill_null("")}, schema=records.REJECT_SCHEMA)
    storage.write_bytes_atomic(storage.join(layer_dir, _chunk_name(part, group, "rejects")),
                               records.parquet_bytes(rejects))
    storage.write_bytes_atomic(storage.join(layer_dir, _chunk_name(part, group)), records.parquet_bytes(kept))
    return pa.table({"rows": [table.num_rows]})


def pending_chunks(dataset_dir: str, layer_dir: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    done = set(storage.list_files(layer_dir, suffix=".parquet"))
    chunks = []
    for index, manifest_uri, _ in base_parts(dataset_dir):
        fs, path = storage.resolve(manifest_uri)
        with fs.open_input_file(path) as f:
            groups = pq.ParquetFile(f).metadata.num_row_groups
        chunks += [{"part": index, "group": g, "manifest": manifest_uri} for g in range(groups)
                   if storage.join(layer_dir, _chunk_name(index, g)) not in done]
    return chunks


def require_dataset(ctx: Any, stage: str) -> str:
    """The finished dataset's folder; a clear error when there is none."""
    from stages.data import buckets, ingest

    dataset_dir = ingest.absolute(ctx.dataset_dir)
    if not storage.exists(storage.join(dataset_dir, buckets.MARKER)):
        raise FileNotFoundError(f"stage={stage} adds columns to a finished dataset, and {dataset_dir} has none "
                                f"(run stage=data first)")
    return dataset_dir


def run_layer(cfg: Any, ctx: Any, stage: str, actor_cls: type, actor_args: dict[str, Any],
              columns: list[str]) -> dict[str, Any]:
    """A metadata pass: ``actor_cls(**actor_args)`` over every sample of the current manifest, as a new layer."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from stages.data import buckets
    from stages.data.runner import Resources

    dataset_dir = require_dataset(ctx, stage)
    layer_dir = _layer_dir(dataset_dir, stage, _digest(actor_args))
    storage.makedirs(layer_dir)
    pending = pending_chunks(dataset_dir, layer_dir)
    res = Resources.from_config(cfg[stage])
    log.info("%s: layer %s, %d chunks pending", stage, layer_dir, len(pending))
    if pending:
        ds = ray.data.from_items(pending, override_num_blocks=len(pending))
        ds = ds.map_batches(read_chunk, batch_size=1, batch_format="numpy",
                            fn_kwargs={"dataset_dir": dataset_dir, "layer_dir": layer_dir, "columns": columns},
                            compute=TaskPoolStrategy(size=Resources.from_config(cfg.ingest).pool_size(len(pending))),
                            num_cpus=0.5)
        ds = ds.map_batches(LayerActor, batch_size=None, batch_format="pyarrow",
                            fn_constructor_kwargs={"actor_cls": actor_cls, "actor_args": actor_args,
                                                   "dataset_dir": dataset_dir},
                            compute=ActorPoolStrategy(size=res.concurrency or 1), **res.remote_args())
        ds = ds.map_batches(write_chunk, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"layer_dir": layer_dir, "columns": columns},
                            compute=TaskPoolStrategy(size=min(2, len(pending))), num_cpus=0)  # metadata only: a few ms
        rows = sum(sum(b.column("rows").to_pylist()) for b in ds.iter_batches(batch_size=None,
                                                                              batch_format="pyarrow"))
    else:
        rows = 0
    missing = pending_chunks(dataset_dir, layer_dir)
    if missing:
        raise RuntimeError(f"{stage}: layer chunks {missing[:5]} produced no output")
    storage.write_json_atomic(storage.join(layer_dir, records.SUCCESS_NAME), {"stage": stage, "args": actor_args})
    stats = buckets.refresh_stats(ctx)
    ctx.log_metrics({f"{stage}/samples": rows})
    return {"dataset_dir": ctx.dataset_dir, "layer": layer_dir, "samples": rows, "kept": stats["samples_kept"],
            "rejected": stats["samples_rejected"]}
