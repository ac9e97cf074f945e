"""Dataset statistics built from fixed-size partial summaries, one per manifest part, merged on the driver.

A partial summary holds counts (kept, rejected, per reason / stage / bucket), the size-below-256 counters, a sparse
2-D histogram of original sizes (32-px bins) and per-unit accounting faults (the first few). Its size does not grow
with the number of samples, so `stats.json` and the plots of a billion-sample dataset cost the driver the same memory
as those of a thousand.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from sdxl.buckets import bucket_name

SMALL_SIDE = 256
HIST_BIN = 32
HIST_BINS = 512  # sides up to 16384 px; larger ones land in the last bin
MAX_EXAMPLES = 20


def part_summary(manifest: pa.Table, rejects: pa.Table) -> dict[str, Any]:
    """The partial summary of one manifest part and the rejects that go with it."""
    h = manifest.column("orig_h").to_numpy(zero_copy_only=False).astype(np.int64)
    w = manifest.column("orig_w").to_numpy(zero_copy_only=False).astype(np.int64)
    hb, wb = np.minimum(h // HIST_BIN, HIST_BINS - 1), np.minimum(w // HIST_BIN, HIST_BINS - 1)
    cells = Counter(zip(wb.tolist(), hb.tolist()))
    buckets = Counter(bucket_name(b) for b in zip(manifest.column("bucket_h").to_pylist(),
                                                   manifest.column("bucket_w").to_pylist()))
    return {
        "kept": manifest.num_rows, "rejected": rejects.num_rows,
        "by_reason": dict(Counter(rejects.column("reason").to_pylist())),
        "by_stage": dict(Counter(rejects.column("stage").to_pylist())),
        "buckets": dict(buckets),
        "below": {"h": int((h < SMALL_SIDE).sum()), "w": int((w < SMALL_SIDE).sum()),
                  "either": int(((h < SMALL_SIDE) | (w < SMALL_SIDE)).sum()),
                  "both": int(((h < SMALL_SIDE) & (w < SMALL_SIDE)).sum())},
        "hist": [[i, j, n] for (i, j), n in cells.items()],
        "faults": [],
        "nodes": {},
    }


def merge(into: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add ``part`` into ``into`` (fresh dict when ``into`` is empty); returns it."""
    if not into:
        into.update(kept=0, rejected=0, by_reason={}, by_stage={}, buckets={},
                    below={"h": 0, "w": 0, "either": 0, "both": 0}, hist={}, faults=[], nodes={})
    into["kept"] += part["kept"]
    into["rejected"] += part["rejected"]
    for name in ("by_reason", "by_stage", "buckets", "below", "nodes"):
        for key, n in part[name].items():
            into[name][key] = into[name].get(key, 0) + n
    for i, j, n in part["hist"]:
        into["hist"][(i, j)] = into["hist"].get((i, j), 0) + n
    into["faults"] = (into["faults"] + part["faults"])[:MAX_EXAMPLES]
    return into


def size_shares(total: dict[str, Any]) -> dict[str, Any]:
    n = total.get("kept", 0)
    below = total.get("below", {})
    share = (lambda k: below.get(k, 0) / n) if n else (lambda k: 0.0)
    return {"n": n, "threshold": SMALL_SIDE, "share_h_below": share("h"), "share_w_below": share("w"),
            "share_either_below": share("either"), "share_both_below": share("both")}


def funnel(inputs: int, by_stage: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per data stage, in pipeline order: how many samples it passed on and rejected."""
    out, remaining = {}, inputs
    for stage in ("ingest", "filter", "caption", "buckets"):
        rejected = int(by_stage.get(stage, 0))
        remaining -= rejected
        out[stage] = {"kept": remaining, "rejected": rejected}
    return out


def write_plots(dataset_dir: str, total: dict[str, Any], scratch: str, log_artifact=None) -> dict[str, Any]:
    """size_heatmap.png, bucket_histogram.png, reject_reasons.png from a merged summary; returns the size shares."""
    from stages.data import plots

    hist = np.zeros((HIST_BINS, HIST_BINS), dtype=np.int64)
    for (i, j), n in total.get("hist", {}).items():
        hist[i, j] += n
    shares = size_shares(total)
    drawings = {
        "size_heatmap.png": lambda p: plots.plot_size_heatmap_binned(hist, HIST_BIN, shares, p, SMALL_SIDE),
        "bucket_histogram.png": lambda p: plots.plot_bucket_histogram(total.get("buckets", {}), p),
        "reject_reasons.png": lambda p: plots.plot_reject_reasons(total.get("by_reason", {}), p),
    }
    os.makedirs(scratch, exist_ok=True)
    for name, draw in drawings.items():
        local = os.path.join(scratch, name)
        draw(local)
        with open(local, "rb") as f:
            storage.write_bytes_atomic(storage.join(dataset_dir, name), f.read())
        if log_artifact is not None:
            log_artifact(local, "data")
    return shares
