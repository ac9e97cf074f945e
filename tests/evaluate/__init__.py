"""Tests of the evaluation stage (stages/evaluate). Helpers: a small dataset in the data stages' output format and the
config sections the stage reads, loaded from pipeline/conf."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from PIL import Image

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf")
SECTIONS = ("mlflow", "model", "data", "loader", "train", "evaluate")


def demo_params(index: int, size: int) -> dict:
    """Demo-data parameters (stages/data/demo_data.py) of one small image: a coloured shape on a plain background."""
    from stages.data.demo_data import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES

    rng = np.random.default_rng(index)
    color = list(OBJECT_COLORS)[index % len(OBJECT_COLORS)]
    background = list(BACKGROUND_COLORS)[index % len(BACKGROUND_COLORS)]
    return {"render_scale": 1, "orig_h": size, "orig_w": size + 8 * (index % 3), "cx": float(rng.uniform(0.35, 0.65)),
            "cy": float(rng.uniform(0.35, 0.65)), "size": 0.4, "shape": SHAPES[index % len(SHAPES)],
            "color": color, "color_rgb": list(OBJECT_COLORS[color]), "background": background,
            "background_rgb": list(BACKGROUND_COLORS[background]), "background_kind": "plain",
            "gradient_direction": None}


def write_dataset(dataset_dir: str, n: int = 24, size: int = 40) -> list[dict]:
    """``<dataset_dir>/manifest.parquet`` + ``shards/<H>x<W>/<H>x<W>-00000.tar`` (webdataset TarWriter, members
    ``<member_key>.png`` / ``<member_key>.json``) as the buckets stage writes them. One sample is a broken image."""
    from webdataset import TarWriter

    from stages.data.demo_data import caption_for, render
    from stages.data.records import MANIFEST_SCHEMA

    bucket = f"{size}x{size}"
    shard = f"shards/{bucket}/{bucket}-00000.tar"
    os.makedirs(os.path.join(dataset_dir, "shards", bucket), exist_ok=True)
    rows = []
    with open(os.path.join(dataset_dir, shard), "wb") as stream, TarWriter(stream, mtime=0) as tar:
        for index in range(n):
            params = demo_params(index, size)
            key = f"demo/{index:04d}"
            member = key.replace("/", "_").replace(".", "_")
            buf = io.BytesIO()
            render(params).save(buf, format="PNG")
            data = buf.getvalue() if index != n - 1 else b"not an image"
            row = {"key": key, "shard": shard, "member_key": member, "bucket_h": size, "bucket_w": size,
                   "orig_h": params["orig_h"], "orig_w": params["orig_w"], "caption": caption_for(params),
                   "caption_synthetic": "", "sha256": f"{index:064x}", "format": "PNG", "source": key,
                   "meta_json": json.dumps(params)}
            tar.write({"__key__": member, "png": data, "json": json.dumps(row).encode("utf-8")})
            rows.append(row)
    table = pa.table({f.name: [r.get(f.name) for r in rows] for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)
    pq.write_table(table, os.path.join(dataset_dir, "manifest.parquet"))
    return rows


def eval_config(root: str, **evaluate):
    """The sections the evaluate stage reads, from their default.yaml files, rooted at ``root``."""
    sections = {name: OmegaConf.load(os.path.join(CONF, name, "default.yaml")) for name in SECTIONS}
    cfg = OmegaConf.merge(OmegaConf.create({"paths": {"root": root}, "preset_name": "tiny"}), sections)
    return OmegaConf.merge(cfg, {"evaluate": evaluate})


def stage_context(cfg, stage: str = "evaluate"):
    """(context manager of the stage's MLflow run, factory of its StageContext) as pipeline/dispatch.py makes them."""
    from pipeline.context import StageContext

    def make(tracker):
        return StageContext(root=str(cfg.paths.root), stage=stage, dataset=str(cfg.data.name),
                            tracking_uri=tracker.tracking_uri if tracker else None,
                            run_id=tracker.run_id if tracker else None, tracker=tracker)

    return make


def image_from_array(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array.astype(np.uint8), "RGB")
