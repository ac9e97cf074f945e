import os

import pyarrow as pa
import pytest

from pipeline import storage


def test_atomic_write_leaves_no_temp_and_lists_only_complete_files(tmp_path):
    target = tmp_path / "a" / "b" / "part-00000.parquet"
    storage.write_parquet_atomic(pa.table({"key": ["x", "y"]}), str(target))
    # A temp file from a killed writer must never be listed as a part.
    (tmp_path / "a" / "b" / ".tmp-deadbeef-part-00001.parquet").write_bytes(b"half")
    assert storage.list_files(str(tmp_path / "a" / "b"), ".parquet") == [str(target)]
    assert storage.read_parquet(str(target)).column("key").to_pylist() == ["x", "y"]
    assert not [n for n in os.listdir(target.parent) if n.startswith(".tmp-") and n != ".tmp-deadbeef-part-00001.parquet"]


def test_write_failure_keeps_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "stats.json"
    storage.write_json_atomic(str(target), {"n": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        storage.write_json_atomic(str(target), {"n": 2})
    assert storage.read_json(str(target)) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_join_and_remote_detection(tmp_path):
    assert storage.join("s3://bucket/prefix", "data", "x.tar") == "s3://bucket/prefix/data/x.tar"
    assert storage.is_remote("s3://bucket") and not storage.is_remote(str(tmp_path))
    assert storage.list_files(str(tmp_path / "missing")) == []
    assert not storage.exists(str(tmp_path / "missing"))


def test_recursive_listing(tmp_path):
    storage.write_bytes_atomic(str(tmp_path / "shards" / "64x64" / "64x64-00000.tar"), b"x")
    storage.write_bytes_atomic(str(tmp_path / "shards" / "32x128" / "32x128-00000.tar"), b"y")
    found = storage.list_files(str(tmp_path / "shards"), ".tar", recursive=True)
    assert [os.path.relpath(f, tmp_path) for f in found] == ["shards/32x128/32x128-00000.tar", "shards/64x64/64x64-00000.tar"]


def test_s3_roundtrip_and_listing(s3_bucket):
    root = storage.join(s3_bucket, "root")
    storage.write_parquet_atomic(pa.table({"key": ["a"]}), storage.join(root, "ingest", "part-00000.parquet"))
    storage.write_json_atomic(storage.join(root, "ingest", "_SUCCESS"), {"parts": 1})
    assert storage.list_files(storage.join(root, "ingest"), ".parquet") == [f"{root}/ingest/part-00000.parquet"]
    assert storage.read_json(storage.join(root, "ingest", "_SUCCESS")) == {"parts": 1}
    assert storage.read_parquet(f"{root}/ingest/part-00000.parquet").num_rows == 1
    storage.remove(storage.join(root, "ingest", "_SUCCESS"))
    assert not storage.exists(storage.join(root, "ingest", "_SUCCESS"))
