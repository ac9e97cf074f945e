"""Buckets: nearest-aspect assignment, re-encoding only when needed, one-bucket tars written once, the shard
writer's unit bookkeeping, and the metadata steps after the pass (dedup, accounting) without Ray."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Iterable

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sdxl.buckets import bucket_table
from stages.data import dedup, finalize, process, records, shards
from stages.data.process import SampleOptions
from tests.data.corrupt_inputs import exif_rotated_jpeg


def _encode(h: int, w: int, fmt: str, value: int = 120) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _raw(key: str, data: bytes) -> dict:
    return {"key": key, "image": data, "caption_raw": f"c {key}", "source": key, "meta": {}}


def _unit(raws: Iterable[dict], unit: int = 0, **opts) -> pa.Table:
    table = process.process_unit(raws, unit, SampleOptions(**opts))
    n = table.num_rows
    return table.set_column(table.schema.get_field_index("unit_size"), "unit_size", pa.array([n] * n, pa.int32()))


def test_assign_nearest_bucket_and_keep_bytes():
    square = _encode(64, 64, "PNG")
    rows = {r["key"]: r for r in _unit([_raw("square", square), _raw("wide", _encode(40, 160, "PNG", 1)),
                                        _raw("tall", _encode(256, 64, "PNG", 2))]).to_pylist()}
    assert (rows["square"]["bucket_h"], rows["square"]["bucket_w"]) == (1024, 1024)
    assert (rows["wide"]["bucket_h"], rows["wide"]["bucket_w"]) == (512, 2048)  # h/w 0.25: the edge bucket
    assert (rows["tall"]["bucket_h"], rows["tall"]["bucket_w"]) == (2048, 512)
    assert rows["square"]["image"] == square  # untouched bytes


def test_each_sample_is_processed_as_it_arrives(monkeypatch):
    """A URL unit yields samples as downloads finish: checking one must not wait for the whole unit to arrive, so
    the checks overlap the downloads still in flight."""
    events, real = [], process.process_sample

    def arrivals():
        for key in ("b", "a"):
            events.append(f"arrived {key}")
            yield _raw(key, _encode(64, 64, "PNG"))

    def recorded(raw, *args):
        events.append(f"checked {raw['key']}")
        return real(raw, *args)

    monkeypatch.setattr(process, "process_sample", recorded)
    table = _unit(arrivals())
    assert events == ["arrived b", "checked b", "arrived a", "checked a"]
    assert table.column("key").to_pylist() == ["a", "b"]  # the table is still in key order


def test_scaled_table_and_downscale_keeps_original_size():
    data = exif_rotated_jpeg(stored_h=60, stored_w=100, orientation=6)  # displayed 100 high, 60 wide
    rows = {r["key"]: r for r in _unit([_raw("big", data), _raw("gif", _encode(30, 30, "GIF"))],
                                       resolution=256, multiple=8, max_side=50).to_pylist()}
    assert (rows["big"]["bucket_h"], rows["big"]["bucket_w"]) in bucket_table(256, 8)
    assert (rows["big"]["orig_h"], rows["big"]["orig_w"]) == (100, 60)  # the size before resizing is kept
    with Image.open(io.BytesIO(rows["big"]["image"])) as img:
        assert img.format == "JPEG" and img.size == (30, 50)  # upright and within max_side
    assert rows["gif"]["format"] == "PNG" and json.loads(rows["gif"]["meta_json"])["reencoded"]["from_format"] == "GIF"


def _writer(tmp_path, per_shard: int = 2) -> shards.ShardWriter:
    return shards.ShardWriter(str(tmp_path), "t0", per_shard, 10**9, 600)


def _tar_names(path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_writer_rolls_tars_per_bucket_and_finishes_units_when_their_tars_close(tmp_path):
    unit0 = _unit([_raw(f"a{i}", _encode(64, 64, "PNG", i)) for i in range(3)] + [_raw("bad", b"<html>")], 0)
    unit1 = _unit([_raw("w0", _encode(40, 160, "PNG", 9))], 1)
    writer = _writer(tmp_path)
    assert writer.append(unit0) == []  # a0, a1 fill a tar; a2 waits in the next one
    assert writer.append(unit1) == []
    assert not (tmp_path / "work" / "part-000000.parquet").exists()
    writer.close()
    part = records.read_tables([str(tmp_path / "work" / "part-000000.parquet")], records.WORK_SCHEMA)
    assert part.column("key").to_pylist() == ["a0", "a1", "a2"]
    rejects = records.read_tables([str(tmp_path / "work" / "rejects-000000.parquet")], records.REJECT_SCHEMA)
    assert [(r["key"], r["reason"]) for r in rejects.to_pylist()] == [("bad", "not_an_image")]
    shard_files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "shards").rglob("*.tar"))
    assert shard_files == ["shards/1024x1024/1024x1024-t0-00000.tar", "shards/1024x1024/1024x1024-t0-00001.tar",
                           "shards/512x2048/512x2048-t0-00002.tar"]
    assert _tar_names(tmp_path / shard_files[0]) == ["a0.png", "a0.json", "a1.png", "a1.json"]
    for row in part.to_pylist():  # the offsets point at the very bytes
        with open(tmp_path / row["shard"], "rb") as f:
            f.seek(row["image_offset"])
            assert f.read(row["image_size"]) == unit0.column("image")[int(row["key"][1])].as_py()
    assert not list(tmp_path.rglob(".tmp-*"))


def test_tars_are_webdataset_readable_and_byte_deterministic(tmp_path):
    import webdataset as wds

    rows = _unit([_raw("a/one", _encode(16, 16, "JPEG")), _raw("b.two", _encode(16, 16, "PNG", 7))]).to_pylist()
    data = shards.tar_bytes(rows, ["a_one", "b_two"])
    assert data == shards.tar_bytes(rows, ["a_one", "b_two"])
    (tmp_path / "s.tar").write_bytes(data)
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a_one", "b_two"]
    assert "jpg" in samples[0] and "png" in samples[1]
    meta = json.loads(samples[1]["json"])
    assert meta["key"] == "b.two" and meta["bucket_h"] == 1024 and meta["orig_h"] == 16
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_a_block_sent_twice_is_written_once(tmp_path):
    block = _unit([_raw("x", _encode(8, 8, "PNG", 1)), _raw("y", _encode(8, 8, "PNG", 2))])
    writer = _writer(tmp_path, per_shard=1)
    writer.append(block.slice(0, 1))
    writer.append(block.slice(0, 1))  # a retried task sends its block again
    writer.append(block)
    writer.append(block)
    writer.close()
    assert len(list((tmp_path / "shards").rglob("*.tar"))) == 2
    part = records.read_tables([str(tmp_path / "work" / "part-000000.parquet")], records.WORK_SCHEMA)
    assert part.column("key").to_pylist() == ["x", "y"]


def test_binary_views_read_values_in_place_through_slices_and_nulls():
    column = pa.chunked_array([pa.array([b"ab", None, b"cde", b""], pa.binary()).slice(1, 3),
                               pa.array([b"f"], pa.binary())])
    views = shards._binary_views(column)
    assert [None if v is None else bytes(v) for v in views] == [None, b"cde", b"", b"f"]


def test_member_names_stay_unique_within_a_tar(tmp_path):
    writer = _writer(tmp_path, per_shard=10)
    writer.append(_unit([_raw("a/b", _encode(8, 8, "PNG", 1)), _raw("a_b", _encode(8, 8, "PNG", 2))]))
    writer.close()
    (tar,) = list((tmp_path / "shards").rglob("*.tar"))
    assert _tar_names(tar) == ["a_b.png", "a_b.json", "a_b_1.png", "a_b_1.json"]


def test_an_aborted_writer_publishes_nothing_half_written(tmp_path):
    writer = _writer(tmp_path, per_shard=10)
    writer.append(_unit([_raw("x", _encode(8, 8, "PNG"))]))
    writer.abort()
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob(".tmp-*"))
    assert not (tmp_path / "work" / "part-000000.parquet").exists()


def test_duplicates_of_keeps_the_first_key_per_hash():
    table = pa.table({"key": ["c", "a", "b", "d", "e"], "sha256": ["h1", "h1", "h2", "h1", "h2"],
                      "unit": pa.array([3, 1, 2, 4, 5], pa.int64())})
    dups = dedup.duplicates_of(table)
    assert list(zip(*(dups.column(c).to_pylist() for c in ("key", "winner", "unit")))) == [
        ("c", "a", 3), ("d", "a", 4), ("e", "b", 5)]


def _work_parts(tmp_path, n_units: int) -> list[str]:
    """Work parts of ``n_units`` units whose images repeat across units (unit u's sample i has the bytes of i)."""
    work = tmp_path / "work"
    for unit in range(n_units):
        rows = [{"key": f"u{unit}/{i}", "unit": unit, "sha256": f"{i:064x}", "shard": "s.tar", "bucket_h": 8,
                 "bucket_w": 8, "orig_h": 8, "orig_w": 8} for i in range(3 + unit)]
        shards.write_unit(str(work), unit, rows, [])
    return records.list_parts(str(work))


@pytest.mark.parametrize("rows_per_task", [10**6, 4])  # one task; hash-partitioned map and reduce tasks
def test_dedup_across_units_in_one_task_or_partitioned(tmp_path, rows_per_task):
    parts = _work_parts(tmp_path, 4)
    count = dedup.find_all(str(tmp_path / "work"), parts, total_rows=18, rows_per_task=rows_per_task)
    dups = dedup.read_for_units(str(tmp_path / "work"), 0, 3)
    assert count == dups.num_rows == 18 - 6  # samples 0..5 stay, in the first unit that has them
    winners = dict(zip(dups.column("key").to_pylist(), dups.column("winner").to_pylist()))
    assert winners["u3/0"] == "u0/0" and winners["u3/3"] == "u1/3" and winners["u3/4"] == "u2/4"
    assert "u3/5" not in winners and "u0/0" not in winners
    assert dedup.read_for_units(str(tmp_path / "work"), 1, 1).column("unit").to_pylist() == [1, 1, 1]
    assert dedup.find_all(str(tmp_path / "work"), parts, 18, rows_per_task) == count  # finished: not redone


def test_unit_faults_name_lost_repeated_and_unknown_keys():
    unit = {"unit": 7, "kind": "folder", "items": [{"key": "a"}, {"key": "b"}, {"key": "c"}]}
    assert finalize.unit_faults(unit, ["a", "b"], ["c"]) == []
    assert "lost ['c']" in finalize.unit_faults(unit, ["a", "b"], [])[0]
    assert any("kept and rejected" in f for f in finalize.unit_faults(unit, ["a", "b", "c"], ["c"]))
    assert any("unknown ['z']" in f for f in finalize.unit_faults(unit, ["a", "b", "c", "z"], []))
    url_unit = {"unit": 1, "kind": "urls", "prefix": "", "start": 10, "count": 2}
    assert finalize.unit_faults(url_unit, ["000000010"], ["000000011"]) == []
    tar_unit = {"unit": 2, "kind": "webdataset"}
    assert any("repeated" in f for f in finalize.unit_faults(tar_unit, ["x", "x"], []))
