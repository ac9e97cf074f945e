"""Model stages: the caption core, scorer and captioner actors in the streaming pass, and the metadata passes that
add columns (re-score, re-caption) to a finished dataset without rewriting a shard."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from stages.data import process
from stages.data.caption import caption_table
from tests.data import data_cfg
from tests.data.corrupt_inputs import EXPECTED, build_corrupt_folder

KEPT = sorted(k for k, v in EXPECTED.items() if v == "kept")


def _caption_rows() -> pa.Table:
    raws = []
    for i, mode in enumerate(("RGB", "RGBA", "CMYK")):
        buf = io.BytesIO()
        Image.fromarray(np.full((12, 16 + i, len(mode)), 40 * i, np.uint8), mode=mode).save(
            buf, "JPEG" if mode == "CMYK" else "PNG")
        raws.append({"key": f"k{i}", "image": buf.getvalue(), "caption_raw": f"orig {i}", "source": "", "meta": {}})
    raws.append({"key": "k3", "source": "", "reject": ("ingest", "download_failed", "404")})
    return process.process_unit(raws, 0, process.SampleOptions())


def test_caption_core_adds_synthetic_and_keeps_original():
    sizes = []

    def fake_captioner(imgs):
        sizes.extend(img.size for img in imgs)
        assert all(img.mode == "RGB" for img in imgs)
        return [f"a {img.size[0]}x{img.size[1]} picture" for img in imgs]

    out = caption_table(_caption_rows(), fake_captioner, batch_size=2).to_pylist()
    assert [r["caption"] for r in out] == ["orig 0", "orig 1", "orig 2", None]
    assert [r["caption_synthetic"] for r in out] == ["a 16x12 picture", "a 17x12 picture", "a 18x12 picture", ""]
    assert len(sizes) == 3 and out[3]["reject_reason"] == "download_failed"  # a rejected row is passed over


def test_caption_failure_is_a_recorded_reject():
    def picky_captioner(imgs):
        if any(img.size[0] == 17 for img in imgs):  # the second sample breaks the model
            raise RuntimeError("model failed")
        return ["ok"] * len(imgs)

    out = caption_table(_caption_rows(), picky_captioner, batch_size=3).to_pylist()
    assert [(r["key"], r["reject_reason"]) for r in out] == [("k0", None), ("k1", "caption_failed"), ("k2", None),
                                                             ("k3", "download_failed")]
    assert "model failed" in out[1]["reject_detail"] and out[1]["reject_stage"] == "caption"


@pytest.mark.slow
@pytest.mark.integration
def test_data_stage_with_scorer_and_captioner_actors_then_a_recaption_pass(ray_local, tmp_path):
    from pipeline.context import StageContext
    from stages.data import caption
    from stages.data import pipeline as data_pipeline
    from stages.train.data_manifest import read_manifest
    from tests.data.test_captioners import TINY_COCA
    from tests.data.test_scorers import TINY_CLIP

    source = build_corrupt_folder(tmp_path / "src")
    ctx = StageContext(root=str(tmp_path / "root"), stage="data", dataset="models")
    cfg = data_cfg(**{"ingest.source": str(source), "caption.synthetic": True, "filter.min_aesthetic": -1e9})
    cfg.scoring = {"enabled": True, "arch": "test-tiny-clip", "pretrained": None, "model_config": TINY_CLIP,
                   "random_init_ok": True, "device": "cpu", "batch_size": 8, "seed": 0}
    cfg.captioner = {"kind": "coca", "arch": "test-tiny-coca", "pretrained": None, "model_config": TINY_COCA,
                     "model": None, "random_init_ok": True, "max_new_tokens": 4, "batch_size": 4, "device": "cpu",
                     "seed": 0}
    result = data_pipeline.run(cfg, ctx)
    manifest = read_manifest(ctx.dataset_dir)
    assert result["kept"] == len(KEPT) == len(manifest)
    assert manifest["clip_score"].notna().all() and manifest["aesthetic_score"].nunique() > 1
    assert all(isinstance(c, str) and c.strip() for c in manifest["caption_synthetic"])  # real, non-empty captions
    assert json.loads((Path(ctx.dataset_dir) / "stats.json").read_text())["accounting"]["ok"]

    tars = {p: os.stat(p).st_mtime_ns for p in (Path(ctx.dataset_dir) / "shards").rglob("*.tar")}
    cfg.captioner.seed = 1  # "a new captioner": other weights, other captions
    caption.run(cfg, StageContext(root=ctx.root, stage="caption", dataset="models"))
    recaptioned = read_manifest(ctx.dataset_dir)
    assert {p: os.stat(p).st_mtime_ns for p in tars} == tars
    assert list(recaptioned["key"]) == list(manifest["key"])
    assert all(isinstance(c, str) and c.strip() for c in recaptioned["caption_synthetic"])
    assert (recaptioned["caption_synthetic"] != manifest["caption_synthetic"]).any()
    assert list(recaptioned["clip_score"]) == list(manifest["clip_score"])  # other columns as they were


def test_metadata_passes_say_what_they_need(make_ctx):
    from stages.data import buckets, caption
    from stages.data import filter as filter_stage

    ctx = make_ctx("caption")
    with pytest.raises(ValueError, match="caption.synthetic=true"):
        caption.run(data_cfg(), ctx)
    with pytest.raises(ValueError, match="scoring.enabled=true"):
        filter_stage.run(data_cfg(), ctx)
    with pytest.raises(FileNotFoundError, match="run stage=data first"):
        caption.run(data_cfg(**{"caption.synthetic": True}), ctx)
    with pytest.raises(FileNotFoundError, match="run stage=data first"):
        buckets.run(data_cfg(), make_ctx("buckets"))
