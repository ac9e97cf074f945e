"""The refiner's training data spans the aesthetic scores it is sampled with (6.0 positive, 2.5 negative; SPEC,
"Refiner aesthetic conditioning"), weighted towards quality by ``loader.weight_by``."""

import collections
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.train.data_loader import build_plan, make_batch_iterator
from stages.train.sample_weights import sample_repeats
from tests.train.shard_fixtures import loader_cfg, stage_cfg, write_dataset

SCORES = [1.5, 2.0, 2.5, 3.5, 4.5, 5.0, 5.5, 6.0, 6.5, 7.5, 8.0, 9.0]


def _scored_root(tmp_path) -> str:
    """A dataset whose aesthetic scores run from 1.5 to 9 (one per sample, in key order)."""
    path = os.path.join(str(tmp_path), "data", "default")
    write_dataset(path, {(64, 64): len(SCORES)})
    manifest = pq.read_table(os.path.join(path, "manifest.parquet")).to_pandas().sort_values("key")
    manifest["aesthetic_score"] = SCORES
    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), os.path.join(path, "manifest.parquet"))
    return str(tmp_path)


@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_refiner_training_set_spans_the_sampling_scores_weighted_towards_quality(tmp_path, preset):
    root = _scored_root(tmp_path)
    cfg = stage_cfg("train_refiner", root, preset=preset,
                    overrides=["loader.multi_aspect=false", "loader.resolution=64"])
    plan = build_plan(cfg, 0, 1, 1)
    scores = plan.samples["aesthetic_score"].to_numpy()
    assert scores.min() <= 2.5 and scores.max() >= 6.0  # the negative (2.5) and positive (6.0) sampling scores
    # every sample is in the stream; high-scoring ones more often than low-scoring ones
    visits = collections.Counter(scores[row] for share in plan.shares for row in share)
    assert set(visits) == set(SCORES)
    assert visits[9.0] > visits[6.0] > visits[2.5] == visits[1.5] >= 1
    # a whole epoch of the stream follows the weights
    batches = make_batch_iterator(cfg, 0, 1, 1, 0, 1)
    keys = [next(batches)["keys"][0] for _ in range(sum(visits.values()))]
    by_key = dict(zip(plan.samples["key"], scores))
    assert collections.Counter(by_key[k] for k in keys) == visits


def test_repeats_follow_the_score_ramp():
    df = pd.DataFrame({"key": list("abcdef"), "aesthetic_score": [2.0, 4.0, 5.0, 6.0, 8.0, np.nan]})
    weight_by = {"column": "aesthetic_score", "low": 4.0, "high": 6.0, "max_weight": 5}
    assert sample_repeats(df, weight_by).tolist() == [1, 1, 3, 5, 5, 1]  # a missing score weighs as the lowest
    assert sample_repeats(df, None).tolist() == [1] * 6


@pytest.mark.parametrize("weight_by, message", [
    ({"column": "nope", "low": 1, "high": 2, "max_weight": 2}, "column 'nope'"),
    ({"column": "aesthetic_score", "low": 3, "high": 2, "max_weight": 2}, "low < high"),
    ({"column": "aesthetic_score", "low": 1, "high": 2, "max_weight": 0}, "max_weight"),
    ({"column": "aesthetic_score", "low": 1, "high": 2, "max_weight": 2.5}, "max_weight"),
    ({"column": "aesthetic_score", "low": 1, "high": 2}, "max_weight"),
])
def test_bad_weight_settings_are_named(weight_by, message):
    df = pd.DataFrame({"key": ["a"], "aesthetic_score": [5.0]})
    with pytest.raises(ValueError, match=f"loader.weight_by.*{message}"):
        sample_repeats(df, weight_by)


def test_weighting_by_an_unscored_column_says_so(tmp_path):
    path = str(tmp_path / "ds")
    write_dataset(path, {(64, 64): 3}, scores=False)
    cfg = loader_cfg(path, weight_by={"column": "aesthetic_score", "low": 4, "high": 6, "max_weight": 2})
    with pytest.raises(ValueError, match="aesthetic_score.*no values.*weight_by=null"):
        build_plan(cfg, 0, 1, 1)
