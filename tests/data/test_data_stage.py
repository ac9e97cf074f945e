"""Stage `data` end to end on the corrupt-input folder: accounting, reasons, shards, manifest, stats, re-runs."""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.data import pipeline as data_pipeline
from stages.data import records
from tests.data import data_cfg
from tests.data.corrupt_inputs import EXPECTED, EXPECTED_SIZES, build_corrupt_folder

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory):
    from pipeline.context import StageContext

    tmp = tmp_path_factory.mktemp("data_stage")
    source = build_corrupt_folder(tmp / "src")
    ctx = StageContext(root=str(tmp / "root"), stage="data", dataset="corrupt")
    cfg = data_cfg(**{"ingest.source": str(source), "ingest.chunk_size": 6, "buckets.samples_per_shard": 3})
    summary = data_pipeline.run(cfg, ctx)
    return cfg, ctx, summary, Path(ctx.dataset_dir)


def test_every_input_in_exactly_one_of_manifest_or_rejects(dataset):
    _, _, summary, out = dataset
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    kept_keys, rejected_keys = [r["key"] for r in manifest], [r["key"] for r in rejects]
    assert len(set(kept_keys)) == len(kept_keys) and len(set(rejected_keys)) == len(rejected_keys)
    assert not set(kept_keys) & set(rejected_keys)
    assert set(kept_keys) | set(rejected_keys) == set(EXPECTED)
    outcome = {**{r["key"]: r["reason"] for r in rejects}, **{k: "kept" for k in kept_keys}}
    assert outcome == EXPECTED
    assert summary["kept"] == len(kept_keys) and summary["rejected"] == len(rejected_keys)


def test_manifest_rows_carry_sizes_buckets_and_shards(dataset):
    _, _, _, out = dataset
    manifest = {r["key"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert "image" not in pq.read_schema(out / "manifest.parquet").names
    for key, size in EXPECTED_SIZES.items():
        assert (manifest[key]["orig_h"], manifest[key]["orig_w"]) == size
    assert (manifest["aspect_1x4"]["bucket_h"], manifest["aspect_1x4"]["bucket_w"]) == (2048, 512)
    assert (manifest["small64"]["bucket_h"], manifest["small64"]["bucket_w"]) == (1024, 1024)
    for row in manifest.values():
        assert (out / row["shard"]).is_file()
        assert row["shard"].startswith(f"shards/{row['bucket_h']}x{row['bucket_w']}/")
    assert manifest["caption_missing"]["caption"] == "" and manifest["caption_long"]["caption_synthetic"] == ""


def test_each_shard_holds_one_bucket_and_reads_back_with_webdataset(dataset):
    import webdataset as wds

    _, _, _, out = dataset
    tars = sorted((out / "shards").rglob("*.tar"))
    assert tars
    seen = []
    for tar in tars:
        bucket = tar.parent.name
        assert tar.name.startswith(bucket + "-")
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        assert 1 <= len(samples) <= 3
        for s in samples:
            meta = json.loads(s["json"])
            assert f"{meta['bucket_h']}x{meta['bucket_w']}" == bucket
            assert any(ext in s for ext in ("jpg", "png", "webp"))
            seen.append(meta["key"])
    assert sorted(seen) == sorted(k for k, v in EXPECTED.items() if v == "kept")


def test_shards_read_back_with_ray_data(dataset):
    import ray

    _, _, _, out = dataset
    rows = ray.data.read_webdataset(str(out / "shards"), file_extensions=["tar"], decoder=None).take_all()
    assert len(rows) == sum(1 for v in EXPECTED.values() if v == "kept")
    assert all("json" in r for r in rows)


def test_stats_and_plots(dataset):
    _, _, _, out = dataset
    stats = json.loads((out / "stats.json").read_text())
    assert stats["accounting"]["ok"] and stats["samples_in"] == len(EXPECTED)
    assert stats["rejects_by_reason"] == dict(Counter(v for v in EXPECTED.values() if v != "kept"))
    assert sum(stats["buckets"].values()) == stats["samples_kept"]
    assert stats["stages"]["ingest"]["kept"] == len(EXPECTED)
    assert stats["share_smaller_than_256"] == 1.0  # every test image is small, and none was dropped for it
    assert (out / "size_heatmap.png").stat().st_size > 0 and (out / "bucket_histogram.png").stat().st_size > 0


def test_rerun_redoes_nothing(dataset):
    cfg, ctx, summary, out = dataset
    files = [p for p in out.rglob("*") if p.is_file() and (p.suffix in (".tar",) or p.name.startswith("part-"))]
    before = {p: os.stat(p).st_mtime_ns for p in files}
    again = data_pipeline.run(cfg, ctx)
    assert {p: os.stat(p).st_mtime_ns for p in files} == before
    assert again["kept"] == summary["kept"] and again["num_shards"] == summary["num_shards"]
    for stage in ("ingest", "filter", "caption", "buckets"):
        assert len(records.list_parts(ctx.stage_dir(stage))) == json.loads(
            (out / stage / "_SUCCESS").read_text())["chunks"]
    with tarfile.open(sorted((out / "shards").rglob("*.tar"))[0]) as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


def _caption_rows() -> pa.Table:
    import io

    import numpy as np
    from PIL import Image

    rows = []
    for i, mode in enumerate(("RGB", "RGBA", "CMYK")):
        buf = io.BytesIO()
        Image.fromarray(np.full((12, 16 + i, len(mode)), 40 * i, np.uint8), mode=mode).save(
            buf, "JPEG" if mode == "CMYK" else "PNG")
        rows.append({"key": f"k{i}", "image": buf.getvalue(), "caption": f"orig {i}", "orig_h": 12, "orig_w": 16 + i,
                     "format": "JPEG" if mode == "CMYK" else "PNG", "meta_json": "{}"})
    return records.table_from_rows(rows, records.FILTER_SCHEMA)


def test_caption_core_adds_synthetic_and_keeps_original():
    from stages.data.caption import caption_table

    table = _caption_rows()
    off, rejects = caption_table(table, None)
    assert off.column("caption_synthetic").to_pylist() == ["", "", ""] and rejects.num_rows == 0
    sizes = []

    def fake_captioner(images):
        sizes.extend(img.size for img in images)
        assert all(img.mode == "RGB" for img in images)
        return [f"a {img.size[0]}x{img.size[1]} picture" for img in images]

    on, rejects = caption_table(table, fake_captioner, batch_size=2)
    assert on.column("caption").to_pylist() == ["orig 0", "orig 1", "orig 2"]
    assert on.column("caption_synthetic").to_pylist() == ["a 16x12 picture", "a 17x12 picture", "a 18x12 picture"]
    assert len(sizes) == 3
    assert on.schema == records.CAPTION_SCHEMA and rejects.num_rows == 0


def test_caption_failure_is_a_recorded_reject():
    from stages.data.caption import caption_table

    def picky_captioner(images):
        if any(img.size[0] == 17 for img in images):  # the second sample breaks the model
            raise RuntimeError("model failed")
        return ["ok"] * len(images)

    kept, rejects = caption_table(_caption_rows(), picky_captioner, batch_size=3)
    assert kept.column("key").to_pylist() == ["k0", "k2"]
    assert [(r["key"], r["reason"]) for r in rejects.to_pylist()] == [("k1", "caption_failed")]
    assert "model failed" in rejects.to_pylist()[0]["detail"]


@pytest.mark.slow
def test_demo_dataset_through_the_data_stage(ray_local, tmp_path):
    from pipeline.context import StageContext
    from stages.data.demo_data import generate_demo_dataset

    summary = generate_demo_dataset(str(tmp_path / "demo"), n=12, seed=3, max_side=320, folder_size=5)
    ctx = StageContext(root=str(tmp_path / "root"), stage="data", dataset="demo")
    cfg = data_cfg(**{"ingest.source": str(tmp_path / "demo"), "buckets.resolution": 256, "buckets.multiple": 8})
    result = data_pipeline.run(cfg, ctx)
    assert result["kept"] == 12 and result["rejected"] == 0  # small images included
    manifest = pq.read_table(Path(ctx.dataset_dir) / "manifest.parquet").to_pylist()
    assert [r["key"] for r in manifest][:2] == ["00000/000000", "00000/000001"]
    for row in manifest:
        params = json.loads(row["meta_json"])["sidecar"]
        assert (row["orig_h"], row["orig_w"]) == (params["orig_h"], params["orig_w"])
        assert row["caption"]
    stats = json.loads((Path(ctx.dataset_dir) / "stats.json").read_text())
    assert stats["share_smaller_than_256"] == pytest.approx(summary["share_small"])


@pytest.mark.slow  # importing open_clip and building even a tiny CoCa takes ~10 s on the test machine
def test_real_captioner_in_the_caption_core():
    from omegaconf import OmegaConf

    from stages.data.caption import caption_table
    from stages.data.captioners import Captioner
    from tests.data.test_captioners import TINY_COCA

    captioner = Captioner.from_config(OmegaConf.create(
        {"kind": "coca", "arch": "test-tiny-coca", "pretrained": None, "model_config": TINY_COCA, "model": None,
         "random_init_ok": True, "max_new_tokens": 4, "batch_size": 2, "device": "cpu", "seed": 0}))
    out, rejects = caption_table(_caption_rows(), captioner.caption, batch_size=2)
    assert rejects.num_rows == 0 and out.num_rows == 3
    assert all(isinstance(c, str) for c in out.column("caption_synthetic").to_pylist())
    assert out.column("caption").to_pylist() == ["orig 0", "orig 1", "orig 2"]


@pytest.mark.slow
def test_data_stage_with_scorer_and_captioner_actors(ray_local, tmp_path):
    from pipeline.context import StageContext
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
    manifest = pq.read_table(Path(ctx.dataset_dir) / "manifest.parquet")
    assert result["kept"] == sum(1 for v in EXPECTED.values() if v == "kept") == manifest.num_rows
    assert manifest.column("clip_score").null_count == 0 and manifest.column("aesthetic_score").null_count == 0
    assert manifest.column("caption_synthetic").null_count == 0
    assert json.loads((Path(ctx.dataset_dir) / "stats.json").read_text())["accounting"]["ok"]
