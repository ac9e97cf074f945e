"""Synthetic captions: keep the source caption and add `caption_synthetic` from a captioning model.

In the streaming pass (`stage=data` with `caption.synthetic=true`) a pool of Ray Data actors loads the `Captioner`
(from the `captioner` section) once each, on GPUs with `caption.num_gpus`. With `caption.synthetic=false` the column is
"" and no model loads. A sample whose image the captioner fails on is rejected (`caption_failed`, with the error).

`stage=caption` on a finished dataset is a metadata pass: it captions the kept samples again (a new captioner),
reading their bytes from the shards, and adds `caption_synthetic` as a layer keyed by sample key; no shard is
rewritten (stages/data/layers.py).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from pipeline.context import StageContext
from stages.data import model_stage

log = logging.getLogger(__name__)
STAGE = "caption"


def caption_table(table: pa.Table, caption_fn: Callable[[list], list[str]], batch_size: int = 8,
                  max_side: int = 512) -> pa.Table:
    """`caption_synthetic` on every live row of a sample table; ``caption_fn`` maps RGB images to captions."""

    def update(row: dict, text: Any) -> None:
        row["caption_synthetic"] = str(text).strip()

    return model_stage.apply(table, lambda imgs, _rows: caption_fn(imgs), batch_size, max_side, update, STAGE,
                             "caption_failed")


def captioning_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.caption.get("synthetic", False))


class CaptionActor:
    """Ray Data actor: loads the captioner once, captions each block."""

    def __init__(self, captioner: dict, batch_size: int, max_side: int):
        from stages.data.captioners import Captioner

        self.captioner = Captioner.from_config(OmegaConf.create(captioner))
        self.batch_size, self.max_side = batch_size, max_side

    def __call__(self, table: pa.Table) -> pa.Table:
        return caption_table(table, self.captioner.caption, self.batch_size, self.max_side)


def actor_args(cfg: DictConfig) -> dict[str, Any]:
    ccfg = cfg.caption
    return {"captioner": OmegaConf.to_container(cfg.captioner, resolve=True),
            "batch_size": int(ccfg.get("batch_size", 8)), "max_side": int(ccfg.get("max_side", 512))}


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    from stages.data import layers

    if not captioning_enabled(cfg):
        raise ValueError("stage=caption on an existing dataset re-captions it: set caption.synthetic=true and the "
                         "captioner (captioner.*)")
    layers.require_dataset(ctx, STAGE)
    return layers.run_layer(cfg, ctx, STAGE, CaptionActor, actor_args(cfg), ["caption_synthetic"])

