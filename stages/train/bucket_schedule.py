"""Which aspect bucket every rank trains on at each step (SDXL Sec. 2.3: one bucket per batch, alternating).

Pure and deterministic: the bucket of step ``s`` is a function of ``(seed, s)`` alone (a counter-based hash, no
sequential RNG state), so every rank computes the same answer without talking to the others, and a run resumed at
step ``s`` continues exactly where an uninterrupted run would be. Buckets are drawn with probability proportional to
their sample counts, so each sample is seen about equally often whatever its bucket.

Buckets holding fewer samples than one global micro-batch (``micro_batch × world_size``) are merged into the
bucket nearest in aspect ratio: otherwise some rank would own no sample of that bucket and could never fill its
share of a step — a collective hang.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Bucket = tuple[int, int]
_STEP_CHUNK = 1 << 20  # steps hashed per numpy call when counting past occurrences


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser over a uint64 array (wrap-around arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hashed_uniform(seed: int, steps: np.ndarray, stream: int = 0) -> np.ndarray:
    """Uniform floats in [0, 1), one per step, a pure function of ``(seed, stream, step)``."""
    key = _splitmix64(np.array([(seed * 0x100000001B3 + stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    with np.errstate(over="ignore"):
        hashed = _splitmix64(key + np.asarray(steps, dtype=np.uint64))
    return (hashed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _log_aspect(bucket: Bucket) -> float:
    return math.log(bucket[0] / bucket[1])


@dataclass(frozen=True)
class MergeResult:
    counts: dict[Bucket, int]  # surviving buckets and their sample counts after merging
    mapping: dict[Bucket, Bucket]  # every input bucket -> the bucket its samples train in (itself when kept)


def merge_small_buckets(counts: dict[Bucket, int], min_count: int) -> MergeResult:
    """Fold every bucket with fewer than ``min_count`` samples into its nearest-aspect neighbour.

    The smallest bucket is merged first (ties: smaller aspect first) into the surviving bucket with the nearest log
    aspect ratio (ties: the larger one), repeated until all survivors reach ``min_count`` or one bucket is left.
    Empty buckets are dropped.
    """
    live = {tuple(b): int(n) for b, n in counts.items() if int(n) > 0}
    mapping: dict[Bucket, Bucket] = {b: b for b in live}
    while len(live) > 1:
        small = min(live, key=lambda b: (live[b], _log_aspect(b)))
        if live[small] >= min_count:
            break
        others = [b for b in live if b != small]
        target = min(others, key=lambda b: (abs(_log_aspect(b) - _log_aspect(small)), -live[b], b))
        live[target] += live.pop(small)
        for src, dst in mapping.items():
            if dst == small:
                mapping[src] = target
    return MergeResult(counts=dict(sorted(live.items())), mapping=mapping)


@dataclass(frozen=True)
class BucketSchedule:
    """Per-step bucket choice shared by all ranks. Build with :func:`build_schedule`."""

    buckets: tuple[Bucket, ...]
    counts: tuple[int, ...]
    seed: int
    mapping: dict[Bucket, Bucket] = field(default_factory=dict)

    def __post_init__(self):
        if not self.buckets or len(self.buckets) != len(self.counts) or min(self.counts) <= 0:
            raise ValueError(f"a bucket schedule needs buckets with positive counts, got {dict(zip(self.buckets, self.counts))}")

    @property
    def probabilities(self) -> np.ndarray:
        c = np.asarray(self.counts, dtype=np.float64)
        return c / c.sum()

    def bucket_indices(self, steps: np.ndarray) -> np.ndarray:
        """Index into ``buckets`` for each step in ``steps``."""
        cumulative = np.cumsum(np.asarray(self.counts, dtype=np.float64))
        u = hashed_uniform(self.seed, np.asarray(steps)) * cumulative[-1]
        return np.minimum(np.searchsorted(cumulative, u, side="right"), len(self.buckets) - 1)

    def bucket_at(self, step: int) -> Bucket:
        return self.buckets[int(self.bucket_indices(np.array([step]))[0])]

    def occurrences_before(self, step: int) -> np.ndarray:
        """How many of the steps ``0 .. step-1`` used each bucket (lets a resumed loader find its place)."""
        total = np.zeros(len(self.buckets), dtype=np.int64)
        for start in range(0, max(int(step), 0), _STEP_CHUNK):
            idx = self.bucket_indices(np.arange(start, min(start + _STEP_CHUNK, step), dtype=np.uint64))
            total += np.bincount(idx, minlength=len(self.buckets))
        return total


def build_schedule(counts: dict[Bucket, int], global_micro_batch: int, seed: int) -> BucketSchedule:
    """A schedule over ``counts`` (bucket -> samples) for a global micro-batch of ``micro × world`` samples."""
    if global_micro_batch <= 0:
        raise ValueError(f"global micro-batch (micro_batch_size × world_size) must be positive, got {global_micro_batch}")
    if sum(int(n) for n in counts.values()) <= 0:
        raise ValueError("no samples to schedule: every bucket is empty")
    merged = merge_small_buckets(counts, global_micro_batch)
    moved = {src: dst for src, dst in merged.mapping.items() if src != dst}
    if moved:
        log.info("merged %d small bucket(s) (< %d samples) into nearest-aspect buckets: %s",
                 len(moved), global_micro_batch, {f"{s[0]}x{s[1]}": f"{d[0]}x{d[1]}" for s, d in moved.items()})
    return BucketSchedule(buckets=tuple(merged.counts), counts=tuple(merged.counts.values()), seed=int(seed),
                          mapping=merged.mapping)
