"""Stage `data` end to end on the corrupt-input folder: accounting, reasons, shards, manifest, index, stats, re-runs."""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.data import pipeline as data_pipeline
from stages.data import process, records
from tests.data import data_cfg
from tests.data.corrupt_inputs import EXPECTED, EXPECTED_SIZES, build_corrupt_folder

pytestmark = pytest.mark.integration
KEPT = sorted(k for k, v in EXPECTED.items() if v == "kept")


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory):
    from pipeline.context import StageContext

    tmp = tmp_path_factory.mktemp("data_stage")
    source = build_corrupt_folder(tmp / "src")
    ctx = StageContext(root=str(tmp / "root"), stage="data", dataset="corrupt")
    # Units of 5: dup_a and dup_b land in different units, so the duplicate is found by the dedup after the pass.
    cfg = data_cfg(**{"ingest.source": str(source), "ingest.chunk_size": 5, "buckets.samples_per_shard": 3})
    summary = data_pipeline.run(cfg, ctx)
    return cfg, ctx, summary, Path(ctx.dataset_dir)


def _manifest(out: Path) -> list[dict]:
    return records.read_dataset(str(out / "manifest.parquet"), records.MANIFEST_SCHEMA).to_pylist()


def test_every_input_in_exactly_one_of_manifest_or_rejects(dataset):
    _, _, summary, out = dataset
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()  # a parquet dataset folder reads as one table
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    kept_keys, rejected_keys = [r["key"] for r in manifest], [r["key"] for r in rejects]
    assert len(set(kept_keys)) == len(kept_keys) and len(set(rejected_keys)) == len(rejected_keys)
    assert not set(kept_keys) & set(rejected_keys)
    outcome = {**{r["key"]: r["reason"] for r in rejects}, **{k: "kept" for k in kept_keys}}
    assert outcome == EXPECTED
    assert next(r for r in rejects if r["key"] == "dup_b")["detail"] == "same bytes as dup_a"
    assert summary["kept"] == len(kept_keys) and summary["rejected"] == len(rejected_keys)


def test_manifest_rows_carry_sizes_buckets_and_byte_offsets(dataset):
    _, _, _, out = dataset
    manifest = {r["key"]: r for r in _manifest(out)}
    for key, size in EXPECTED_SIZES.items():
        assert (manifest[key]["orig_h"], manifest[key]["orig_w"]) == size
    assert (manifest["aspect_1x4"]["bucket_h"], manifest["aspect_1x4"]["bucket_w"]) == (2048, 512)
    assert (manifest["small64"]["bucket_h"], manifest["small64"]["bucket_w"]) == (1024, 1024)
    source = Path(manifest["ok_jpeg"]["source"])
    for row in manifest.values():
        assert row["shard"].startswith(f"shards/{row['bucket_h']}x{row['bucket_w']}/")
        with open(out / row["shard"], "rb") as f:
            f.seek(row["image_offset"])
            image = f.read(row["image_size"])
        if row["key"] == "ok_jpeg":
            assert image == source.read_bytes()  # the bytes as they were, found by offset
    assert manifest["caption_missing"]["caption"] == "" and manifest["caption_long"]["caption_synthetic"] == ""


def test_each_shard_holds_one_bucket_and_reads_back_with_webdataset(dataset):
    import webdataset as wds

    _, _, _, out = dataset
    tars = sorted((out / "shards").rglob("*.tar"))
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
    # dup_b was written before the dedup across units found it: its copy stays in its tar, listed nowhere.
    assert sorted(seen) == sorted(KEPT + ["dup_b"])


def test_shard_index_lists_every_shard_with_its_samples(dataset):
    _, _, _, out = dataset
    index = pq.read_table(out / "shard_index.parquet").to_pylist()
    tars = {p.relative_to(out).as_posix(): p.stat().st_size for p in (out / "shards").rglob("*.tar")}
    assert {r["shard"]: r["bytes"] for r in index} == tars
    per_shard = Counter(r["shard"] for r in _manifest(out))
    assert {r["shard"]: r["samples"] for r in index} == {s: per_shard.get(s, 0) for s in tars}
    unreferenced = [r for r in index if r["unreferenced_bytes"] > 0]
    assert len(unreferenced) == 1 and unreferenced[0]["unreferenced_bytes"] >= 1024  # dup_b's members


def test_shards_read_back_with_ray_data(dataset):
    import ray

    _, _, _, out = dataset
    rows = ray.data.read_webdataset(str(out / "shards"), file_extensions=["tar"], decoder=None).take_all()
    assert len(rows) == len(KEPT) + 1 and all("json" in r for r in rows)


def test_stats_and_plots(dataset):
    _, _, _, out = dataset
    stats = json.loads((out / "stats.json").read_text())
    assert stats["accounting"]["ok"] and stats["samples_in"] == len(EXPECTED)
    assert stats["rejects_by_reason"] == dict(Counter(v for v in EXPECTED.values() if v != "kept"))
    assert sum(stats["buckets"].values()) == stats["samples_kept"] == len(KEPT)
    assert stats["stages"]["ingest"]["kept"] == len(EXPECTED)
    assert stats["stages"]["filter"]["kept"] == len(KEPT)
    assert stats["share_smaller_than_256"] == 1.0  # every test image is small, and none was dropped for it
    assert stats["unreferenced_shard_bytes"] > 0 and stats["num_shards"] == sum(stats["shards"].values())
    for plot in ("size_heatmap.png", "bucket_histogram.png", "reject_reasons.png"):
        assert (out / plot).stat().st_size > 0


def test_rerun_redoes_nothing(dataset):
    cfg, ctx, summary, out = dataset
    files = [p for p in out.rglob("*") if p.is_file() and (p.suffix in (".tar", ".parquet", ".json", ".png"))]
    before = {p: os.stat(p).st_mtime_ns for p in files}
    again = data_pipeline.run(cfg, ctx)
    assert {p: os.stat(p).st_mtime_ns for p in files} == before
    assert again["kept"] == summary["kept"] and again["num_shards"] == summary["num_shards"]
    assert again["units_run"] == 0 and summary["units_run"] == summary["units"] == 5
    with tarfile.open(sorted((out / "shards").rglob("*.tar"))[0]) as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


class FakeScoreActor:
    """A scorer actor for metadata passes: the aesthetic score is the image's mean pixel / 25 (0..10.2), and
    images darker than ``min_mean`` fail the threshold."""

    def __init__(self, min_mean: float):
        self.min_mean = min_mean

    def __call__(self, table: pa.Table) -> pa.Table:
        from stages.data import images

        rows = table.to_pylist()
        for row in rows:
            if row["reject_reason"] is None:
                mean = float(np.asarray(images.decode_rgb(row["image"])).mean())
                row["aesthetic_score"] = mean / 25.0
                if mean < self.min_mean:
                    process.reject(row, "filter", "low_aesthetic_score", f"mean {mean:.1f}")
        return records.table_from_rows(rows, table.schema)


def test_a_metadata_pass_adds_columns_and_rejects_without_touching_shards(dataset):
    """Last in this module: it adds a layer to the shared dataset."""
    from stages.data import layers
    from stages.train.data_manifest import read_manifest

    cfg, ctx, _, out = dataset
    tars = {p: os.stat(p).st_mtime_ns for p in (out / "shards").rglob("*.tar")}
    before = read_manifest(str(out))
    assert before["aesthetic_score"].isna().all()
    result = layers.run_layer(cfg, ctx, "filter", FakeScoreActor, {"min_mean": 100.0}, ["aesthetic_score"])
    after = read_manifest(str(out))
    assert {p: os.stat(p).st_mtime_ns for p in tars} == tars  # no shard rewritten
    assert after["aesthetic_score"].notna().all() and len(after) < len(before) == len(KEPT)
    dropped = set(before["key"]) - set(after["key"])
    layer_rejects = records.read_tables(sorted(str(p) for p in Path(result["layer"]).glob("rejects-*.parquet")),
                                        records.REJECT_SCHEMA).to_pylist()
    assert dropped == {r["key"] for r in layer_rejects} and {r["reason"] for r in layer_rejects} == {
        "low_aesthetic_score"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples_kept"] == len(after) and stats["accounting"]["ok"]
    assert stats["rejects_by_reason"]["low_aesthetic_score"] == len(dropped)
    again = layers.run_layer(cfg, ctx, "filter", FakeScoreActor, {"min_mean": 100.0}, ["aesthetic_score"])
    assert again["layer"] == result["layer"] and again["samples"] == 0  # resumed: nothing left to do
    assert layers.layer_names(str(out)) == [Path(result["layer"]).name]


@pytest.mark.slow
def test_demo_dataset_through_the_data_stage(ray_local, tmp_path):
    from pipeline.context import StageContext
    from stages.data.demo_data import generate_demo_dataset

    summary = generate_demo_dataset(str(tmp_path / "demo"), n=12, seed=3, max_side=320, folder_size=5)
    ctx = StageContext(root=str(tmp_path / "root"), stage="data", dataset="demo")
    cfg = data_cfg(**{"ingest.source": str(tmp_path / "demo"), "buckets.resolution": 256, "buckets.multiple": 8})
    result = data_pipeline.run(cfg, ctx)
    assert result["kept"] == 12 and result["rejected"] == 0  # small images included
    manifest = sorted(_manifest(Path(ctx.dataset_dir)), key=lambda r: r["key"])
    assert [r["key"] for r in manifest][:2] == ["00000/000000", "00000/000001"]
    for row in manifest:
        params = json.loads(row["meta_json"])["sidecar"]
        assert (row["orig_h"], row["orig_w"]) == (params["orig_h"], params["orig_w"])
        assert row["caption"]
    stats = json.loads((Path(ctx.dataset_dir) / "stats.json").read_text())
    assert stats["share_smaller_than_256"] == pytest.approx(summary["share_small"])
