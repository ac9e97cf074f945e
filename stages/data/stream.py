"""The streaming pass of `stage=data`: every pending unit read, checked and written in one pass, bytes read once and
written once, into the final shards.

    units ─► read + check + hash + bucket (CPU tasks; URL units download here) ─► [scorer actors] ─► [captioner actors]
          ─► shard writers (Ray actors, one open tar per bucket each) ─► work/part-<unit>.parquet when a unit is done

With model stages it is one Ray Data pipeline whose operators overlap: readers fill blocks while model actors score
earlier ones and writers append later ones. Without models, reading and forwarding to a writer are one plain Ray task
per unit, a bounded window of them submitted at once: a one-operator pipeline gains nothing from Ray Data's executor,
whose start, stats actors and scheduling loop cost ~4 s per run and CPU per second of it (docs/decisions.md,
"The data pass without Ray Data's executor"). Blocks carry every input of their unit (rejected ones without bytes),
so the writer sees each unit whole and records its rejects with its kept samples.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig

from pipeline import storage
from stages.data import download, plan, process, records, shards, sources

log = logging.getLogger(__name__)
TICK_S = 5.0  # how often the driver lets writers close tars that have been open too long


@dataclass(frozen=True)
class ReadOptions:
    samples: process.SampleOptions
    download: download.DownloadOptions
    image_column: str | None = None
    caption_column: str | None = None


def read_samples(unit: dict, opts: ReadOptions):
    kind = unit["kind"]
    if kind == "folder":
        return sources.read_folder_unit(unit)
    if kind == "webdataset":
        return sources.read_tar_unit(unit)
    if kind == "parquet":
        return sources.read_parquet_unit(unit, opts.image_column, opts.caption_column)
    if kind in ("urls", "url_rows"):
        return download.read_url_unit(unit, opts.download)
    raise ValueError(f"unknown unit kind {kind!r}")


def read_unit_table(unit: dict, opts: ReadOptions, node: str | None = None) -> pa.Table:
    """The sample table of one planned unit (the pure core of the read task)."""
    table = process.process_unit(read_samples(unit, opts), int(unit["unit"]), opts.samples)
    n = table.num_rows
    table = table.set_column(table.schema.get_field_index("unit_size"), "unit_size", pa.array([n] * n, pa.int32()))
    return table.set_column(table.schema.get_field_index("node"), "node", pa.array([node] * n, pa.string()))


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def forward(table: pa.Table, writers: list) -> pa.Table:
    """Hand a block to the writer that owns its unit (all blocks of a unit go to the same writer); a summary back."""
    import ray

    if table.num_rows == 0:
        return pa.table({"unit": pa.array([], pa.int64()), "rows": pa.array([], pa.int64())})
    unit = int(table.column("unit")[0].as_py())
    ray.get(writers[unit % len(writers)].append.remote(table))
    return pa.table({"unit": [unit], "rows": [table.num_rows]})


def read_pending_unit(part: str, group: int, opts: ReadOptions, work_dir: str) -> pa.Table:
    """Read one pending unit from its plan part; a unit with no input at all is finished here (nothing to write)."""
    unit = plan.read_unit(part, group)
    table = read_unit_table(unit, opts, _node_id())
    if table.num_rows == 0:
        shards.write_unit(work_dir, int(unit["unit"]), [], [], _node_id())
    return table


def read_units(batch: dict[str, Any], opts: ReadOptions, work_dir: str) -> pa.Table:
    """Ray Data task body (batch_size=1), when model stages follow."""
    return read_pending_unit(str(batch["part"][0]), int(batch["group"][0]), opts, work_dir)


def read_and_forward(entry: dict[str, Any], opts: ReadOptions, work_dir: str, writers: list) -> int:
    """Ray task body when no model stage follows: read one pending unit, hand it to its writer; its row count."""
    table = read_pending_unit(str(entry["part"]), int(entry["group"]), opts, work_dir)
    forward(table, writers)
    return table.num_rows


def _tick_when_due(writers: list, last_tick: float) -> float:
    """Every TICK_S the writers close tars open longer than `buckets.shard_max_open_s`; the time of the last tick."""
    import ray

    if time.monotonic() - last_tick <= TICK_S:
        return last_tick
    ray.get([w.tick.remote() for w in writers])
    return time.monotonic()


def _task_window(read: Any, cluster_cpus: float, pending: int) -> int:
    """Reader tasks kept submitted at once: the configured concurrency, else twice what the cluster's CPUs run (so a
    freed CPU finds the next unit queued; memory stays bounded by the window × one unit)."""
    size = read.pool_size(pending)
    if size is None:
        size = 2 * max(1, int(cluster_cpus // max(read.num_cpus, 1e-3)))
    return max(1, min(size, pending))


def _run_reader_tasks(pending: list[dict[str, Any]], opts: ReadOptions, work_dir: str, writers: list, read: Any,
                      progress_interval_s: float) -> int:
    """Every pending unit as a Ray task (spread over the nodes), at most a window of them submitted at once; the
    writers' tick runs between completions. Returns the rows forwarded."""
    import ray
    from tqdm import tqdm

    task = ray.remote(read_and_forward).options(scheduling_strategy="SPREAD", **read.remote_args())
    opts_ref, window = ray.put(opts), _task_window(read, ray.cluster_resources().get("CPU", 1), len(pending))
    queue, running, rows, last_tick = iter(pending), [], 0, time.monotonic()
    with tqdm(total=len(pending), desc="data pass (units)", mininterval=progress_interval_s, unit="unit") as bar:
        while True:
            while len(running) < window and (entry := next(queue, None)) is not None:
                running.append(task.remote(entry, opts_ref, work_dir, writers))
            if not running:
                return rows
            done, running = ray.wait(running, num_returns=1, timeout=TICK_S)
            for rows_of_unit in ray.get(done):  # a failed unit raises here, as Ray Data would
                rows += rows_of_unit
                bar.update(1)
            last_tick = _tick_when_due(writers, last_tick)


def pending_units(plan_dir: str, work_dir: str) -> list[dict[str, Any]]:
    """(unit, plan part, row group) of the units without a work part (one listing of the work folder)."""
    done = {records.part_index(uri) for uri in records.list_parts(work_dir)}
    return [{"unit": u, "part": part, "group": group} for u, part, group in plan.unit_index(plan_dir)
            if u not in done]


class WriterActor(shards.ShardWriter):
    """The shard writer as a Ray actor (created by :func:`run_pass`)."""


def _remove_stale_temp_files(folder_uri: str) -> None:
    """Local temp files of a killed run (its open tars, a work part it was writing) never became outputs; drop them
    (object stores keep no such leftovers)."""
    import os

    if storage.is_remote(folder_uri) or not os.path.isdir(folder_uri):
        return
    for folder, _, names in os.walk(folder_uri):
        for name in names:
            if name.startswith(".tmp-"):
                os.remove(os.path.join(folder, name))


def run_pass(cfg: DictConfig, dataset_dir: str) -> dict[str, Any]:
    """Run every pending unit of the plan; returns counts of this run."""
    import ray

    from stages.data import caption as caption_stage, filter as filter_stage
    from stages.data.runner import Resources

    plan_dir, work_dir = storage.join(dataset_dir, plan.PLAN_DIR), storage.join(dataset_dir, shards.WORK_DIR)
    pending = pending_units(plan_dir, work_dir)
    if not pending:
        return {"units_run": 0}
    storage.makedirs(work_dir)
    _remove_stale_temp_files(storage.join(dataset_dir, shards.SHARDS_DIR))
    _remove_stale_temp_files(work_dir)
    icfg, bcfg = cfg.ingest, cfg.buckets
    opts = ReadOptions(process.SampleOptions.from_config(cfg), download.DownloadOptions.from_config(icfg.download),
                       icfg.get("image_column"), icfg.get("caption_column"))
    run_tag = uuid.uuid4().hex[:6]
    writing = Resources.from_config(bcfg)
    # One writer keeps up with many readers (it only moves bytes): by default one per 16 CPUs of the cluster.
    auto_writers = max(1, int(ray.cluster_resources().get("CPU", 1)) // 16)
    n_writers = min(len(pending), writing.concurrency or auto_writers)
    writer_cls = ray.remote(WriterActor).options(num_cpus=writing.num_cpus, scheduling_strategy="SPREAD",
                                                 max_concurrency=1)
    writers = [writer_cls.remote(dataset_dir, f"w{i:02d}{run_tag}", int(bcfg.samples_per_shard),
                                 int(float(bcfg.get("shard_target_mb", 1000)) * 2**20),
                                 float(bcfg.get("shard_max_open_s", 600))) for i in range(n_writers)]
    models = [(filter_stage.ScoreActor, filter_stage.actor_args(cfg), Resources.from_config(cfg.filter))
              if filter_stage.scoring_enabled(cfg) else None,
              (caption_stage.CaptionActor, caption_stage.actor_args(cfg), Resources.from_config(cfg.caption))
              if caption_stage.captioning_enabled(cfg) else None]
    models = [m for m in models if m is not None]
    read = Resources.from_config(icfg)
    log.info("data pass: %d units pending; readers %s, %d shard writers, model stages: %s", len(pending),
             read.concurrency or "as the CPUs allow", n_writers, [m[0].__name__ for m in models] or "none")
    started = time.monotonic()
    try:
        if models:
            rows = _run_dataset(pending, opts, work_dir, writers, read, models, n_writers)
        else:
            rows = _run_reader_tasks(pending, opts, work_dir, writers, read,
                                     float(cfg.get("ray", {}).get("progress_interval_s", 30) or 30))
        summaries = ray.get([w.close.remote() for w in writers])
    except BaseException:
        # Open tars are dropped, never published half-written; finished units keep their parts.
        ray.wait([w.abort.remote() for w in writers], num_returns=len(writers), timeout=30)
        raise
    missing = pending_units(plan_dir, work_dir)
    if missing:
        raise RuntimeError(f"data pass: units {[m['unit'] for m in missing[:10]]} produced no work part")
    return {"units_run": len(pending), "rows": rows, "seconds": round(time.monotonic() - started, 1),
            "shards_written": sum(s["shards"] for s in summaries)}


def _run_dataset(pending: list[dict[str, Any]], opts: ReadOptions, work_dir: str, writers: list, read: Any,
                 models: list, n_writers: int) -> int:
    """With model stages: one Ray Data pipeline, readers → model actor pools → forwarders, so they overlap."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ds = ray.data.from_items(pending, override_num_blocks=len(pending))
    ds = ds.map_batches(read_units, batch_size=1, batch_format="numpy", zero_copy_batch=True,
                        fn_kwargs={"opts": opts, "work_dir": work_dir},
                        compute=TaskPoolStrategy(size=read.pool_size(len(pending))), **read.remote_args())
    for actor_cls, args, res in models:
        ds = ds.map_batches(actor_cls, batch_size=None, batch_format="pyarrow", fn_constructor_kwargs=args,
                            compute=ActorPoolStrategy(size=res.concurrency or 1), **res.remote_args())
    ds = ds.map_batches(forward, batch_size=None, batch_format="pyarrow", fn_kwargs={"writers": writers},
                        # it only waits on a writer: no CPU reserved
                        compute=TaskPoolStrategy(size=min(len(pending), max(2, n_writers))), num_cpus=0)
    last_tick, rows = time.monotonic(), 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += sum(batch.column("rows").to_pylist())
        last_tick = _tick_when_due(writers, last_tick)
    return rows
