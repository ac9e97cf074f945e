"""Filtering: the image checks of the streaming pass (stages/data/process.py, images.py) and model scores.

Reject reasons, first failing check wins: `not_an_image` (a payload PIL cannot identify that is not an image by its
magic bytes: text, HTML) / `undecodable` (empty, truncated or corrupt data; see `filter.decode_check`) /
`decompression_bomb` (header pixel count above `filter.max_pixels`, checked before decoding) / `duplicate` (same
sha256 as a sample whose key sorts first, across the whole dataset) / `aspect_out_of_range` (h/w outside
`filter.min_aspect..max_aspect` with `out_of_range=reject`) / score thresholds (`low_clip_score`,
`low_aesthetic_score`, `high_watermark_prob`, `high_nsfw_prob`) when a scorer is configured (`scoring_failed` when it
raises on an image). Never for being small. Score columns stay null without a scorer.

`stage=filter` on a finished dataset is a metadata pass: it scores the kept samples again (a new aesthetic model,
other thresholds) reading their bytes from the shards, and adds the score columns (and threshold rejects) as a layer
keyed by sample key; no shard is rewritten (stages/data/layers.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from pipeline.context import StageContext
from stages.data import model_stage, process, records

log = logging.getLogger(__name__)
STAGE = "filter"
find_duplicates = process.find_duplicates
sha256_hex = process.sha256_hex

# (score column, option name, reason, True when a value *below* the threshold fails)
THRESHOLDS = (
    ("clip_score", "min_clip_score", "low_clip_score", True),
    ("aesthetic_score", "min_aesthetic", "low_aesthetic_score", True),
    ("watermark_prob", "max_watermark", "high_watermark_prob", False),
    ("nsfw_prob", "max_nsfw", "high_nsfw_prob", False),
)


@dataclass(frozen=True)
class ScoreOptions:
    min_clip_score: float | None = None
    min_aesthetic: float | None = None
    max_watermark: float | None = None
    max_nsfw: float | None = None
    score_batch_size: int = 16
    score_max_side: int = 512

    def __post_init__(self) -> None:
        if self.score_batch_size < 1:
            raise ValueError(f"filter.score_batch_size must be >= 1, got {self.score_batch_size}")

    @classmethod
    def from_config(cls, fcfg: Any) -> "ScoreOptions":
        container = OmegaConf.to_container(fcfg, resolve=True) if isinstance(fcfg, DictConfig) else dict(fcfg)
        return cls(**{k: container[k] for k in cls.__dataclass_fields__ if k in container})


def threshold_reason(scores: dict[str, float | None], opts: ScoreOptions) -> tuple[str | None, str]:
    for column, option, reason, below_fails in THRESHOLDS:
        limit, value = getattr(opts, option), scores.get(column)
        if limit is None or value is None or np.isnan(value):
            continue
        if (value < limit) if below_fails else (value > limit):
            return reason, f"{column}={value:.4f} {'<' if below_fails else '>'} {option}={limit}"
    return None, ""


def _unpack(scores: dict, n: int) -> list[dict[str, float]]:
    arrays = {name: np.asarray(scores[name], dtype=np.float64).reshape(-1) for name in records.SCORE_COLUMNS
              if name in scores}
    if any(len(a) != n for a in arrays.values()):
        raise ValueError(f"scorer returned {[len(a) for a in arrays.values()]} scores for {n} images")
    return [{name: float(a[i]) for name, a in arrays.items()} for i in range(n)]


def score_table(table: pa.Table, scorer: Any, opts: ScoreOptions) -> pa.Table:
    """Scores on every live row of a sample table; threshold failures and scorer failures become rejects."""

    def score(imgs: list, rows: list[dict]) -> list[dict[str, float]]:
        return _unpack(scorer.score(imgs, [r["caption"] or "" for r in rows]), len(imgs))

    def update(row: dict, values: dict[str, float]) -> None:
        row.update(values)
        reason, detail = threshold_reason(values, opts)
        if reason is not None:
            process.reject(row, STAGE, reason, detail)

    return model_stage.apply(table, score, opts.score_batch_size, opts.score_max_side, update, STAGE,
                             "scoring_failed")


def build_scorer(scoring_cfg: Any) -> Any:
    """The configured image-text scorer, or None when the section is absent or `scoring.enabled` is false."""
    if scoring_cfg is None or not scoring_cfg.get("enabled", True):
        return None
    from stages.data.scorers import ImageTextScorer

    return ImageTextScorer.from_config(scoring_cfg)


def scoring_enabled(cfg: DictConfig) -> bool:
    scoring = cfg.get("scoring")
    return scoring is not None and bool(scoring.get("enabled", False))


class ScoreActor:
    """Ray Data actor of the streaming pass and of `stage=filter`: loads the scorer once (on a GPU with
    `filter.num_gpus`), scores each block."""

    def __init__(self, scoring: dict, options: dict):
        self.scorer = build_scorer(OmegaConf.create(scoring))
        self.opts = ScoreOptions(**options)

    def __call__(self, table: pa.Table) -> pa.Table:
        return score_table(table, self.scorer, self.opts)


def actor_args(cfg: DictConfig) -> dict[str, Any]:
    """Constructor arguments of :class:`ScoreActor` for ``cfg`` (plain containers: they travel to the actors)."""
    opts = ScoreOptions.from_config(cfg.filter)
    return {"scoring": OmegaConf.to_container(cfg.scoring, resolve=True), "options": opts.__dict__}


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    from stages.data import layers

    if not scoring_enabled(cfg):
        raise ValueError("stage=filter on an existing dataset re-scores it: set scoring.enabled=true and the score "
                         "models (scoring.*); the image checks themselves run in stage=data")
    layers.require_dataset(ctx, STAGE)
    return layers.run_layer(cfg, ctx, STAGE, ScoreActor, actor_args(cfg), list(records.SCORE_COLUMNS))
