"""Stage `caption`: keep the source caption and add `caption_synthetic` from a captioning model.

With `caption.synthetic=false` the column is empty and no model is loaded. Otherwise each Ray Data actor loads the
`Captioner` (from the `captioner` config section) once; `caption.num_gpus` puts the actors on GPUs. A sample whose
image the captioner fails on is rejected with reason `caption_failed` (the detail holds the error).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.context import StageContext
from stages.data import records, runner, sources

log = logging.getLogger(__name__)
STAGE = "caption"


# --------------------------------------------------------------------------------------------- pure core
def caption_table(table: pa.Table, caption_fn: Callable[[list], list[str]] | None, batch_size: int = 8,
                  max_side: int = 512) -> tuple[pa.Table, pa.Table]:
    """(rows in the caption schema, rejects). ``caption_fn`` maps RGB PIL images to captions; None leaves
    `caption_synthetic` empty."""
    rows = table.to_pylist()
    rejects: list[dict[str, str]] = []
    if caption_fn is None:
        for row in rows:
            row["caption_synthetic"] = ""
        return records.table_from_rows(rows, records.CAPTION_SCHEMA), records.rejects_table(rejects)
    kept = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        images = [sources.decode_rgb(row["image"], max_side) for row in batch]
        try:
            captions = list(caption_fn(images))
            if len(captions) != len(batch):
                raise ValueError(f"captioner returned {len(captions)} captions for {len(batch)} images")
        except Exception:  # retry one by one, so one bad image does not cost its neighbours their captions
            captions = []
            for row, image in zip(batch, images):
                try:
                    captions.append(str(caption_fn([image])[0]))
                except Exception as err:
                    captions.append(None)
                    rejects.append(records.reject_row(row["key"], STAGE, "caption_failed",
                                                      f"{type(err).__name__}: {err}"))
        for row, text in zip(batch, captions):
            if text is not None:
                row["caption_synthetic"] = str(text).strip()
                kept.append(row)
    return records.table_from_rows(kept, records.CAPTION_SCHEMA), records.rejects_table(rejects)


# --------------------------------------------------------------------------------------------- Ray wrapper
class CaptionWorker(runner.ChunkWorker):
    def __init__(self, stage_dir: str, synthetic: bool, batch_size: int, max_side: int, captioner: dict | None):
        super().__init__(stage_dir)
        self.batch_size, self.max_side = batch_size, max_side
        self.caption_fn = None
        if synthetic:
            if captioner is None:
                raise ValueError("caption.synthetic=true needs a `captioner` config section")
            from stages.data.captioners import Captioner

            self.caption_fn = Captioner.from_config(OmegaConf.create(captioner)).caption

    def process(self, chunk: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
        return caption_table(storage.read_parquet(chunk["input"]), self.caption_fn, self.batch_size, self.max_side)


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    ccfg = cfg.caption
    filter_dir, stage_dir = runner.absolute(ctx.stage_dir("filter")), runner.absolute(ctx.stage_dir(STAGE))
    runner.require_success(filter_dir, "filter")
    synthetic = bool(ccfg.get("synthetic", False))
    captioner = cfg.get("captioner")
    if synthetic and captioner is None:
        raise ValueError("caption.synthetic=true needs a `captioner` config section")
    batch_size = int(ccfg.get("batch_size", 8))
    if batch_size < 1:
        raise ValueError(f"caption.batch_size must be >= 1, got {batch_size}")
    options = {"synthetic": synthetic, "batch_size": batch_size, "max_side": int(ccfg.get("max_side", 512)),
               "captioner": OmegaConf.to_container(captioner, resolve=True) if synthetic else None}
    counts = runner.run_stage(STAGE, stage_dir, runner.previous_parts_plan(filter_dir), CaptionWorker, options,
                              runner.Resources.from_config(ccfg), {"synthetic": synthetic})
    ctx.log_metrics({f"{STAGE}/kept": counts["kept"], f"{STAGE}/rejected": counts["rejected"]})
    log.info("caption: %s", counts)
    return counts
