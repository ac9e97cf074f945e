"""Chunked, resumable execution of a data stage on Ray Data.

A stage describes its work as a list of JSON-able *chunks* (`{"index": i, ...}`), saved once in `_chunks.json` so a
re-run sees the same plan. Chunks whose `part-NNNNN.parquet` already exists are skipped; the pending ones go through
`ray.data.from_items(...).map_batches(<ChunkWorker subclass>, batch_size=1, concurrency=N)`. The worker is an actor so a
model loads once per actor; it writes the chunk's rejects and then its part, both atomically, so an existing part means
a finished chunk. When every chunk is done the stage writes `_SUCCESS` with its counts.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from pipeline import storage
from stages.data import records

log = logging.getLogger(__name__)

PLAN_NAME = "_chunks.json"


@dataclass(frozen=True)
class Resources:
    """How many actors a stage runs and what each one reserves."""

    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @classmethod
    def from_config(cls, section: Any) -> "Resources":
        concurrency = int(section.get("concurrency", 1) or 1)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        return cls(concurrency=concurrency, num_cpus=float(section.get("num_cpus", 1.0)),
                   num_gpus=float(section.get("num_gpus", 0.0) or 0.0))


class ChunkWorker:
    """Base class of a stage's Ray Data actor. Subclasses implement ``process``."""

    def __init__(self, stage_dir: str, **options: Any):
        self.stage_dir = stage_dir
        self.options = options

    def process(self, chunk: dict[str, Any]) -> tuple[pa.Table, pa.Table | None]:
        """(kept samples, rejects or None) for one chunk."""
        raise NotImplementedError(f"{type(self).__name__} must implement process(chunk)")

    def run_chunk(self, chunk: dict[str, Any]) -> tuple[int, int]:
        """Process one chunk and write its outputs; (kept, rejected) counts."""
        index = int(chunk["index"])
        kept, rejects = self.process(chunk)
        if rejects is not None:
            storage.write_parquet_atomic(rejects, storage.join(self.stage_dir, records.rejects_name(index)))
        # The part is written last: its existence marks the chunk as done.
        storage.write_parquet_atomic(kept, storage.join(self.stage_dir, records.part_name(index)))
        return kept.num_rows, 0 if rejects is None else rejects.num_rows

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"index": [], "kept": [], "rejected": []}
        for chunk_json in batch["chunk"]:
            chunk = json.loads(str(chunk_json))
            kept, rejected = self.run_chunk(chunk)
            out["index"].append(int(chunk["index"]))
            out["kept"].append(kept)
            out["rejected"].append(rejected)
        return out


def chunk_output(stage_dir: str, chunk: dict[str, Any]) -> str:
    """The file whose existence marks ``chunk`` as done: its `output` (relative to the stage folder) or its part."""
    if "output" in chunk:
        return storage.join(stage_dir, *str(chunk["output"]).split("/"))
    return storage.join(stage_dir, records.part_name(int(chunk["index"])))


def absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers need not share the driver's working directory."""
    uri = str(uri)
    return uri if storage.is_remote(uri) or uri.startswith("file://") else os.path.abspath(uri)


def load_or_make_plan(stage_dir: str, make_plan: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The stage's chunk list: the saved one when a previous run made it, else ``make_plan()`` (then saved)."""
    plan_uri = storage.join(stage_dir, PLAN_NAME)
    if storage.exists(plan_uri):
        return storage.read_json(plan_uri)
    plan = make_plan()
    for i, chunk in enumerate(plan):
        if chunk.get("index") != i:
            raise ValueError(f"chunk plan of {stage_dir} must be indexed 0..n-1, chunk {i} has index {chunk.get('index')}")
    storage.write_json_atomic(plan_uri, plan)
    return plan


def pending_chunks(stage_dir: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks whose output file is missing (one listing, not one request per chunk: cheap on object stores)."""
    existing = set(storage.list_files(stage_dir, recursive=True))
    return [c for c in plan if chunk_output(stage_dir, c) not in existing]


def run_chunks(stage_dir: str, plan: list[dict[str, Any]], worker_cls: type[ChunkWorker],
               worker_options: dict[str, Any], resources: Resources) -> int:
    """Run the pending chunks of ``plan`` through Ray Data; returns how many chunks ran."""
    pending = pending_chunks(stage_dir, plan)
    if not pending:
        log.info("%s: all %d chunks already done", stage_dir, len(plan))
        return 0
    log.info("%s: %d of %d chunks to run", stage_dir, len(pending), len(plan))
    import ray

    items = [{"chunk": json.dumps(c)} for c in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    extra = {"num_gpus": resources.num_gpus} if resources.num_gpus > 0 else {}
    results = dataset.map_batches(
        worker_cls,
        fn_constructor_kwargs={"stage_dir": stage_dir, **worker_options},
        batch_size=1,
        batch_format="numpy",
        concurrency=min(resources.concurrency, len(pending)),
        num_cpus=resources.num_cpus,
        **extra,
    ).take_all()
    missing = pending_chunks(stage_dir, plan)
    if missing:
        raise RuntimeError(f"{stage_dir}: chunks {[c['index'] for c in missing]} produced no part")
    return len(results)


def stage_counts(stage_dir: str) -> dict[str, Any]:
    """Counts over every part and rejects file of a stage folder."""
    kept = sum(records.num_rows(uri) for uri in records.list_parts(stage_dir))
    rejects = records.read_rejects(stage_dir)
    by_reason = Counter(rejects.column("reason").to_pylist())
    return {"kept": kept, "rejected": rejects.num_rows, "rejects_by_reason": dict(sorted(by_reason.items()))}


def write_success(stage_dir: str, stage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    counts = {"stage": stage, **stage_counts(stage_dir), **(extra or {})}
    storage.write_json_atomic(storage.join(stage_dir, records.SUCCESS_NAME), counts)
    return counts


def require_success(stage_dir: str, stage: str) -> dict[str, Any]:
    """The counts of a finished stage; a clear error when it has not finished."""
    marker = storage.join(stage_dir, records.SUCCESS_NAME)
    if not storage.exists(marker):
        raise FileNotFoundError(f"stage '{stage}' has not finished: {marker} is missing (run stage={stage} first)")
    return storage.read_json(marker)


def run_stage(stage: str, stage_dir: str, make_plan: Callable[[], list[dict[str, Any]]],
              worker_cls: type[ChunkWorker], worker_options: dict[str, Any], resources: Resources,
              extra_counts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan (or reload the plan), run what is pending, write `_SUCCESS`; returns the stage's counts."""
    stage_dir = absolute(stage_dir)
    storage.makedirs(stage_dir)
    plan = load_or_make_plan(stage_dir, make_plan)
    ran = run_chunks(stage_dir, plan, worker_cls, worker_options, resources)
    counts = write_success(stage_dir, stage, {"chunks": len(plan), **(extra_counts or {})})
    counts["chunks_run"] = ran
    return counts


def previous_parts_plan(previous_dir: str) -> Callable[[], list[dict[str, Any]]]:
    """Plan for a stage that maps each part of the previous stage to one part of its own."""

    def make() -> list[dict[str, Any]]:
        return [{"index": i, "input": uri} for i, uri in enumerate(records.list_parts(previous_dir))]

    return make
