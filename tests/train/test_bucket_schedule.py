import numpy as np
import pytest

from stages.train.bucket_schedule import build_schedule, hashed_uniform, merge_small_buckets


def test_hashed_uniform_is_pure_and_uniform():
    steps = np.arange(20000)
    u = hashed_uniform(7, steps)
    assert np.array_equal(u, hashed_uniform(7, steps))
    assert not np.array_equal(u, hashed_uniform(8, steps))
    assert u.min() >= 0.0 and u.max() < 1.0
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.all(np.abs(hist - 2000) < 200)


def test_bucket_frequencies_follow_sizes():
    counts = {(64, 64): 500, (48, 80): 300, (80, 48): 150, (32, 128): 50}
    sched = build_schedule(counts, global_micro_batch=4, seed=3)
    n = 40000
    observed = np.bincount(sched.bucket_indices(np.arange(n)), minlength=len(sched.buckets))
    expected = sched.probabilities * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    assert dict(zip(sched.buckets, sched.counts)) == counts


def test_bucket_at_depends_only_on_seed_and_step():
    counts = {(64, 64): 10, (48, 80): 10, (80, 48): 10}
    a = build_schedule(counts, 2, seed=11)
    b = build_schedule(dict(reversed(list(counts.items()))), 2, seed=11)
    assert [a.bucket_at(s) for s in range(200)] == [b.bucket_at(s) for s in range(200)]
    c = build_schedule(counts, 2, seed=12)
    assert [a.bucket_at(s) for s in range(200)] != [c.bucket_at(s) for s in range(200)]


def test_occurrences_before_counts_past_steps():
    sched = build_schedule({(64, 64): 5, (48, 80): 3}, 1, seed=0)
    idx = sched.bucket_indices(np.arange(137))
    assert np.array_equal(sched.occurrences_before(137), np.bincount(idx, minlength=2))
    assert sched.occurrences_before(0).sum() == 0


def test_small_buckets_merge_into_nearest_aspect():
    counts = {(64, 64): 20, (56, 72): 3, (32, 128): 2, (128, 32): 30}
    merged = merge_small_buckets(counts, min_count=8)
    # 32x128 (aspect 1/4) is nearer 56x72 than 64x64; both then fold into 64x64.
    assert merged.mapping[(32, 128)] == (64, 64)
    assert merged.mapping[(56, 72)] == (64, 64)
    assert merged.mapping[(128, 32)] == (128, 32)
    assert merged.counts == {(64, 64): 25, (128, 32): 30}
    assert sum(merged.counts.values()) == sum(counts.values())


def test_schedule_never_leaves_a_bucket_below_the_global_micro_batch():
    counts = {(64, 64): 9, (48, 80): 2, (80, 48): 1, (40, 96): 1}
    sched = build_schedule(counts, global_micro_batch=4, seed=1)
    assert min(sched.counts) >= 4
    assert set(sched.mapping) == set(counts)
    assert sum(sched.counts) == 13


def test_tiny_dataset_collapses_to_one_bucket():
    sched = build_schedule({(64, 64): 1, (48, 80): 1}, global_micro_batch=8, seed=0)
    assert len(sched.buckets) == 1 and sched.counts == (2,)


def test_bad_inputs():
    with pytest.raises(ValueError, match="global micro-batch"):
        build_schedule({(64, 64): 3}, 0, seed=0)
    with pytest.raises(ValueError, match="no samples"):
        build_schedule({(64, 64): 0}, 1, seed=0)
