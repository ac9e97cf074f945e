"""Stage `buckets`: the dataset's metadata from the finished streaming pass — manifest, rejects, shard index, stats.

Buckets themselves are assigned per sample in the streaming pass (stages/data/process.py: the App. I table scaled to
`buckets.resolution`, sides multiples of `buckets.multiple`, nearest aspect ratio; `orig_h/orig_w` kept for size
conditioning) and each shard holds one bucket (stages/data/shards.py). What is left needs every sample at once and
runs on metadata only (stages/data/finalize.py): dedup across units, publishing the manifest and rejects, the shard
index, `stats.json` and the Fig. 2 heatmap, bucket histogram and reject-reason plots. `stage=data` ends with it;
`stage=buckets` runs it again (after a metadata pass, or to redraw the plots) without touching a shard.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from pipeline import storage
from pipeline.context import StageContext
from stages.data import finalize, ingest, plan, records, summary

log = logging.getLogger(__name__)
STAGE = "buckets"
MARKER = "_SUCCESS"


def build_stats(info: dict[str, Any], total: dict[str, Any], shard_totals: dict[str, Any],
                shares: dict[str, Any]) -> dict[str, Any]:
    kept, rejected = total.get("kept", 0), total.get("rejected", 0)
    inputs = int(info["planned_inputs"]) if info.get("counts_known") else kept + rejected
    faults = list(total.get("faults", []))
    if kept + rejected != inputs:
        faults.append(f"{kept} kept + {rejected} rejected != {inputs} inputs")
    return {
        "stages": summary.funnel(inputs, total.get("by_stage", {})),
        "samples_in": inputs, "samples_kept": kept, "samples_rejected": rejected,
        "rejects_by_reason": dict(sorted(total.get("by_reason", {}).items())),
        "rejects_by_stage": dict(sorted(total.get("by_stage", {}).items())),
        "buckets": dict(sorted(total.get("buckets", {}).items())),
        "shards": dict(sorted(shard_totals.get("per_bucket_shards", {}).items())),
        "num_shards": shard_totals.get("shards", 0),
        "shard_bytes": shard_totals.get("bytes", 0),
        "unreferenced_shard_bytes": shard_totals.get("unreferenced_bytes", 0),
        "shard_size_mb": finalize.size_quantiles(shard_totals.get("size_mb_hist", {})),
        "shard_size_mb_hist": {str(k): v for k, v in sorted(shard_totals.get("size_mb_hist", {}).items(),
                                                              key=lambda kv: int(kv[0]))},
        f"share_smaller_than_{summary.SMALL_SIDE}": shares["share_either_below"],
        "size_summary": shares,
        "units": info.get("units"), "units_by_node": total.get("nodes", {}),
        "source": info.get("source"), "source_kind": info.get("source_kind"),
        "ignored_files": info.get("ignored_files", 0),
        "accounting": {"inputs": inputs, "manifest": kept, "rejects": rejected, "ok": not faults,
                       "faults": faults[:summary.MAX_EXAMPLES]},
    }


def finalize_dataset(cfg: DictConfig, ctx: StageContext, force: bool = False) -> dict[str, Any]:
    """Steps 1-4 of stages/data/finalize.py (skipped when done for the same work, unless ``force``); the stats."""
    from stages.data import layers

    dataset_dir = ingest.absolute(ctx.dataset_dir)
    info = plan.load_info(storage.join(dataset_dir, plan.PLAN_DIR))
    if info is None:
        raise FileNotFoundError(f"{dataset_dir} has no finished plan: run stage=data first")
    marker_uri = storage.join(dataset_dir, MARKER)
    state = {"units": info["units"], "layers": layers.layer_names(dataset_dir)}
    stats_uri = storage.join(dataset_dir, "stats.json")
    if not force and storage.exists(marker_uri) and storage.read_json(marker_uri) == state \
            and storage.exists(stats_uri):
        return storage.read_json(stats_uri)
    total, shard_totals = finalize.publish(dataset_dir, int(info.get("chunk_size") or 1))
    if state["layers"]:  # the current manifest: the base with the metadata layers applied
        current = layers.current_summary(dataset_dir)
        current.update(faults=total.get("faults", []), nodes=total.get("nodes", {}))
        total = current
    shares = summary.write_plots(dataset_dir, total, ctx.scratch_dir(), ctx.log_artifact)
    stats = build_stats(info, total, shard_totals, shares)
    storage.write_json_atomic(stats_uri, stats)
    _log(ctx, stats)
    if not stats["accounting"]["ok"]:
        raise RuntimeError(f"data accounting broken (every input must be in manifest or rejects once): "
                           f"{stats['accounting']}")
    storage.write_json_atomic(marker_uri, state)
    return stats


def refresh_stats(ctx: StageContext) -> dict[str, Any]:
    """stats.json and the plots of the current manifest (after a metadata pass), on metadata only."""
    from stages.data import layers

    dataset_dir = ingest.absolute(ctx.dataset_dir)
    info = plan.load_info(storage.join(dataset_dir, plan.PLAN_DIR))
    stats_uri = storage.join(dataset_dir, "stats.json")
    previous = storage.read_json(stats_uri)
    shard_totals = {"shards": previous["num_shards"], "bytes": previous["shard_bytes"],
                    "unreferenced_bytes": previous["unreferenced_shard_bytes"],
                    "per_bucket_shards": previous["shards"], "size_mb_hist": previous.get("shard_size_mb_hist", {})}
    total = layers.current_summary(dataset_dir)
    total["nodes"] = previous.get("units_by_node", {})
    shares = summary.write_plots(dataset_dir, total, ctx.scratch_dir(), ctx.log_artifact)
    stats = build_stats(info, total, shard_totals, shares)
    storage.write_json_atomic(stats_uri, stats)
    _log(ctx, stats)
    storage.write_json_atomic(storage.join(dataset_dir, MARKER),
                              {"units": info["units"], "layers": layers.layer_names(dataset_dir)})
    return stats


def _log(ctx: StageContext, stats: dict[str, Any]) -> None:
    metrics = {"data/samples_in": stats["samples_in"], "data/samples_kept": stats["samples_kept"],
               "data/samples_rejected": stats["samples_rejected"], "data/num_shards": stats["num_shards"],
               f"data/share_smaller_than_{summary.SMALL_SIDE}": stats[f"share_smaller_than_{summary.SMALL_SIDE}"]}
    metrics.update({f"data/rejects/{r}": n for r, n in stats["rejects_by_reason"].items()})
    metrics.update({f"data/bucket/{b}": n for b, n in stats["buckets"].items()})
    ctx.log_metrics(metrics)
    ctx.log_dict(stats, "data/stats.json")
    log.info("buckets: %d kept in %d shards, %d rejected", stats["samples_kept"], stats["num_shards"],
             stats["samples_rejected"])


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    stats = finalize_dataset(cfg, ctx, force=True)
    return {"kept": stats["samples_kept"], "rejected": stats["samples_rejected"], "num_shards": stats["num_shards"],
            "buckets": stats["buckets"], "dataset_dir": ctx.dataset_dir,
            "manifest": storage.join(ctx.dataset_dir, records.MANIFEST_NAME)}
