"""Sampling weights by a score column (``loader.weight_by``): how often each selected sample is drawn.

``weight_by: {column, low, high, max_weight}`` gives a sample the weight ``1 + (max_weight - 1)·clip((score - low) /
(high - low), 0, 1)`` rounded to a whole number: 1 at or below ``low``, ``max_weight`` at or above ``high``, a linear
ramp between; a sample without a score weighs 1. The loader puts a sample that many times into its bucket's share,
so each epoch of a bucket's stream visits it that often while the stream stays deterministic and resumable
(stages/train/data_loader.py); with several ranks its copies may be dealt to different ranks. The refiner uses it to
train on the whole range of aesthetic scores it is sampled with (6.0 positive, 2.5 negative) while seeing good images
more often (docs/decisions.md).
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

WEIGHT_KEYS = ("column", "low", "high", "max_weight")


def _settings(df: pd.DataFrame, weight_by) -> tuple[str, float, float, int]:
    where = df.attrs.get("path", "manifest")
    missing = [k for k in WEIGHT_KEYS if weight_by.get(k) is None]
    if missing:
        raise ValueError(f"loader.weight_by needs {list(WEIGHT_KEYS)}; missing {missing}")
    column, low, high, max_weight = (weight_by[k] for k in WEIGHT_KEYS)
    if column not in df.columns:
        raise ValueError(f"loader.weight_by column {column!r} is not in {where}; columns: {list(df.columns)}")
    if df[column].isna().all():
        raise ValueError(f"loader.weight_by column {column!r} has no values in {where} (was its scorer configured in "
                         f"the filter stage?); set loader.weight_by=null to weigh every sample equally")
    if not float(low) < float(high):
        raise ValueError(f"loader.weight_by needs low < high, got low={low}, high={high}")
    if isinstance(max_weight, bool) or not isinstance(max_weight, numbers.Integral) or max_weight < 1:
        raise ValueError(f"loader.weight_by.max_weight must be a whole number >= 1, got {max_weight!r}")
    return str(column), float(low), float(high), int(max_weight)


def sample_repeats(df: pd.DataFrame, weight_by) -> np.ndarray:
    """How many times each row of ``df`` enters the loader's stream per epoch (all ones when ``weight_by`` is None)."""
    if not weight_by:
        return np.ones(len(df), dtype=np.int64)
    column, low, high, max_weight = _settings(df, weight_by)
    scores = df[column].astype("float64").to_numpy()
    ramp = np.clip((scores - low) / (high - low), 0.0, 1.0)
    weights = 1.0 + (max_weight - 1) * np.nan_to_num(ramp, nan=0.0)
    return np.rint(weights).astype(np.int64)
