"""Buckets: nearest-aspect assignment, re-encoding only when needed, deterministic one-bucket shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sdxl.buckets import bucket_table
from stages.data import buckets, records, shards
from tests.data.corrupt_inputs import exif_rotated_jpeg


def _encode(h: int, w: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _row(key: str, h: int, w: int, fmt: str = "PNG", data: bytes | None = None) -> dict:
    return {"key": key, "image": data if data is not None else _encode(h, w, fmt), "caption": f"c {key}",
            "source": key, "orig_h": h, "orig_w": w, "format": fmt, "meta_json": "{}", "sha256": key * 4,
            "caption_synthetic": ""}


def test_assign_nearest_bucket_and_keep_bytes():
    table = records.table_from_rows([_row("square", 64, 64), _row("wide", 40, 160), _row("tall", 256, 64)],
                                    records.CAPTION_SCHEMA)
    out, rejects = buckets.assign_table(table, resolution=1024, multiple=64)
    rows = {r["key"]: r for r in out.to_pylist()}
    assert rejects.num_rows == 0 and out.schema == records.BUCKET_SCHEMA
    assert (rows["square"]["bucket_h"], rows["square"]["bucket_w"]) == (1024, 1024)
    assert (rows["wide"]["bucket_h"], rows["wide"]["bucket_w"]) == (512, 2048)  # h/w 0.25: the edge bucket
    assert (rows["tall"]["bucket_h"], rows["tall"]["bucket_w"]) == (2048, 512)
    assert rows["square"]["image"] == table.column("image")[0].as_py()  # untouched bytes


def test_scaled_table_and_downscale_keeps_original_size():
    data = exif_rotated_jpeg(stored_h=60, stored_w=100, orientation=6)  # displayed 100 high, 60 wide
    table = records.table_from_rows([_row("big", 100, 60, "JPEG", data), _row("gif", 30, 30, "GIF"),
                                     _row("nosize", None, None, data=b"x")], records.CAPTION_SCHEMA)
    out, rejects = buckets.assign_table(table, resolution=256, multiple=8, max_side=50)
    rows = {r["key"]: r for r in out.to_pylist()}
    assert (rows["big"]["bucket_h"], rows["big"]["bucket_w"]) in bucket_table(256, 8)
    assert (rows["big"]["orig_h"], rows["big"]["orig_w"]) == (100, 60)  # the size before resizing is kept
    with Image.open(io.BytesIO(rows["big"]["image"])) as img:
        assert img.format == "JPEG" and img.size == (30, 50)  # upright and within max_side
    assert rows["gif"]["format"] == "PNG" and json.loads(rows["gif"]["meta_json"])["reencoded"]["from_format"] == "GIF"
    assert [(r["key"], r["reason"]) for r in rejects.to_pylist()] == [("nosize", "missing_size")]


def test_member_keys_are_safe_and_unique():
    names = shards.member_keys(["a/b.c", "a_b_c", "x"])
    assert names == {"a/b.c": "a/b.c".replace("/", "_").replace(".", "_"), "a_b_c": "a_b_c_1", "x": "x"}
    assert len(set(names.values())) == 3 and not any("." in n or "/" in n for n in names.values())


def test_plan_shards_is_deterministic_and_one_bucket_per_shard():
    keys = [f"k{i:02d}" for i in range(7)]
    bh = [64, 128, 64, 64, 128, 64, 64]
    index = pa.table({"key": keys, "bucket_h": pa.array(bh, pa.int32()), "bucket_w": pa.array([64] * 7, pa.int32()),
                      "part": ["p0"] * 7, "row_group": [0 if h == 64 else 1 for h in bh]})
    plan = shards.plan_shards(index, samples_per_shard=2)
    shuffled = shards.plan_shards(index.take(pa.array([6, 3, 0, 5, 2, 1, 4])), samples_per_shard=2)
    assert plan == shuffled
    assert [c["output"] for c in plan] == ["64x64/64x64-00000.tar", "64x64/64x64-00001.tar",
                                           "64x64/64x64-00002.tar", "128x64/128x64-00000.tar"]
    assert [m["key"] for m in plan[0]["members"]] == ["k00", "k02"]
    assert {m["row_group"] for m in plan[3]["members"]} == {1}
    assert all(c["output"].startswith(c["bucket"] + "/" + c["bucket"] + "-") for c in plan)
    assert sorted(m["key"] for c in plan for m in c["members"]) == keys
    with pytest.raises(ValueError, match="samples_per_shard"):
        shards.plan_shards(index, 0)


def test_tar_reads_back_with_webdataset(tmp_path):
    import webdataset as wds

    rows = []
    for key, fmt in (("a/one", "JPEG"), ("b.two", "PNG")):
        row = {**_row(key, 16, 16, fmt), "bucket_h": 64, "bucket_w": 64, "sha256": "0" * 64}
        rows.append({**{n: None for n in records.SCORE_COLUMNS}, **row})
    data = shards.tar_bytes(rows, ["a_one", "b_two"])
    assert data == shards.tar_bytes(rows, ["a_one", "b_two"])  # byte-deterministic
    (tmp_path / "s.tar").write_bytes(data)
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a_one", "b_two"]
    assert "jpg" in samples[0] and "png" in samples[1]
    meta = json.loads(samples[1]["json"])
    assert meta["key"] == "b.two" and meta["bucket_h"] == 64 and meta["orig_h"] == 16


def test_accounting_detects_loss_and_repeats():
    assert buckets.accounting(["a", "b"], ["a"], ["b"])["ok"]
    assert not buckets.accounting(["a", "b"], ["a"], [])["ok"]
    assert not buckets.accounting(["a", "b"], ["a", "b"], ["b"])["ok"]
    assert buckets.small_share([100, 300], [300, 300]) == 0.5


def test_grouped_part_has_one_row_group_per_bucket(tmp_path):
    rows = [{**_row(f"k{i}", 8, 8), "bucket_h": h, "bucket_w": 64} for i, h in enumerate([128, 64, 128, 64, 64])]
    table = records.table_from_rows(rows, records.BUCKET_SCHEMA)
    uri = str(tmp_path / "part-00000.parquet")
    records.write_grouped_parquet_atomic(table, uri, ["bucket_h", "bucket_w"])
    index = records.row_group_index(uri, ["key", "bucket_h"])
    assert index.column("row_group").to_pylist() == [0, 0, 0, 1, 1]
    assert index.column("key").to_pylist() == ["k1", "k3", "k4", "k0", "k2"]
    assert records.read_row_groups(uri, [1], ["key"]).column("key").to_pylist() == ["k0", "k2"]
    records.write_grouped_parquet_atomic(table.slice(0, 0), uri, ["bucket_h", "bucket_w"])
    assert records.num_rows(uri) == 0
