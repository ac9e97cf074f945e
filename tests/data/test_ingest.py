"""Ingest: header sizes with EXIF, caption normalisation, folder/tar/parquet sources, and the Ray stage."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from stages.data import ingest, records, sources
from tests.data import data_cfg
from tests.data.corrupt_inputs import EXPECTED, EXPECTED_SIZES, LONG_CAPTION, build_corrupt_folder, exif_rotated_jpeg


def test_probe_swaps_sides_for_exif_rotation_without_decoding():
    header = sources.probe_image(exif_rotated_jpeg(stored_h=30, stored_w=50, orientation=6))
    assert (header.height, header.width, header.orientation, header.format) == (50, 30, 6, "JPEG")
    upright = sources.probe_image(exif_rotated_jpeg(stored_h=30, stored_w=50, orientation=1))
    assert (upright.height, upright.width) == (30, 50)


def test_probe_reads_bomb_header_and_reports_garbage():
    from tests.data.corrupt_inputs import png_header_only

    bomb = sources.probe_image(png_header_only(60000, 50000))
    assert bomb.ok and (bomb.height, bomb.width) == (50000, 60000)
    assert not sources.probe_image(b"").ok
    assert not sources.probe_image(b"<html></html>").ok
    assert sources.sniff_payload(b"<!doctype html><p>x") == "html"
    assert sources.sniff_payload(b"hello") == "text"
    assert sources.sniff_payload(b"\xff\xd8\xff\x00") == "jpeg"


@pytest.mark.parametrize("raw, expected, flags", [
    (None, "", ["caption_missing"]),
    (b"", "", ["caption_empty"]),
    (b"  a cat\n", "a cat", []),
    (b"caf\xe9", "caf\ufffd", ["caption_invalid_utf8"]),
    ("x" * 30, "x" * 10, ["caption_truncated"]),
])
def test_normalize_caption(raw, expected, flags):
    assert ingest.normalize_caption(raw, max_chars=10) == (expected, flags)


def test_folder_plan_keys_sidecars_and_collisions(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.jpg", "a/x.png", "a/x.txt", "b.png", "b.json", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    plan, ignored = sources.plan_folder(str(tmp_path), chunk_size=2, extensions=sources.IMAGE_EXTENSIONS)
    items = [item for chunk in plan for item in chunk["items"]]
    assert [c["index"] for c in plan] == [0, 1]
    assert [i["key"] for i in items] == ["a/x", "a/x.png", "b"]  # the second a/x keeps its extension
    assert items[1]["key_collision"] and items[0]["txt"] == items[1]["txt"] == "a/x.txt"
    assert items[2]["json"] == "b.json" and items[2]["txt"] is None
    assert ignored == 1


def test_ingest_chunk_on_corrupt_folder(tmp_path):
    root = build_corrupt_folder(tmp_path / "src")
    plan, ignored = sources.plan_folder(str(root), 1000, sources.IMAGE_EXTENSIONS)
    table, rejects = ingest.ingest_chunk(plan[0], max_caption_chars=2000)
    assert table.schema == records.INGEST_SCHEMA and rejects.num_rows == 0 and ignored == 1
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == set(EXPECTED)  # ingest judges nothing: every file becomes a row
    for key, (h, w) in EXPECTED_SIZES.items():
        assert (rows[key]["orig_h"], rows[key]["orig_w"]) == (h, w), key
    flags = {k: json.loads(r["meta_json"]).get("flags", []) for k, r in rows.items()}
    assert "caption_missing" in flags["caption_missing"] and rows["caption_missing"]["caption"] == ""
    assert "caption_invalid_utf8" in flags["caption_bad_utf8"] and "\ufffd" in rows["caption_bad_utf8"]["caption"]
    assert "caption_truncated" in flags["caption_long"] and rows["caption_long"]["caption"] == LONG_CAPTION[:2000]
    assert "header_unreadable" in flags["zero_bytes"] and rows["zero_bytes"]["orig_h"] is None
    assert json.loads(rows["ok_jpeg"]["meta_json"])["sidecar"] == {"generator": "test", "seed": 2}
    assert rows["bomb"]["orig_h"] == 60000
    assert rows["sub/nested"]["image"] == (root / "sub" / "nested.png").read_bytes()


def test_tar_and_parquet_sources(tmp_path):
    jpeg = exif_rotated_jpeg(10, 20, orientation=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("s1.jpg", jpeg), ("s1.txt", b"one"), ("s2.json", b'{"caption": "two"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-0.tar").write_bytes(buf.getvalue())
    tar_plan = sources.plan_tars(str(tmp_path / "shards"))
    table, rejects = ingest.ingest_chunk(tar_plan[0], 100)
    assert table.column("key").to_pylist() == ["shard-0/s1"] and table.column("caption").to_pylist() == ["one"]
    assert rejects.to_pylist()[0]["key"] == "shard-0/s2" and rejects.to_pylist()[0]["reason"] == "missing_image"

    pq.write_table(pa.table({"key": ["a", "b", "c"], "jpg": [jpeg, None, None], "caption": ["x", "y", "z"],
                             "status": ["success", "success", "failed_to_download"],
                             "error_message": [None, None, "HTTP Error 404: Not Found"]}),
                   tmp_path / "p.parquet", row_group_size=1)
    plan = sources.plan_parquet(str(tmp_path / "p.parquet"), chunk_size=2)
    assert [(c["row_groups"], c["start"]) for c in plan] == [([0, 1], 0), ([2], 2)]
    tables = [ingest.ingest_chunk(c, 100) for c in plan]
    kept = pa.concat_tables([t for t, _ in tables])
    rejected = pa.concat_tables([r for _, r in tables]).to_pylist()
    assert kept.column("key").to_pylist() == ["p/a"] and kept.column("orig_w").to_pylist() == [20]
    assert [(r["key"], r["reason"]) for r in rejected] == [("p/b", "missing_image"), ("p/c", "download_failed")]
    assert "404" in rejected[1]["detail"]


def test_detect_source_kind(tmp_path):
    build_corrupt_folder(tmp_path / "imgs")
    assert sources.detect_source_kind(str(tmp_path / "imgs")) == "folder"
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["c"]}), tmp_path / "urls.parquet")
    assert sources.detect_source_kind(str(tmp_path / "urls.parquet")) == "urls"
    with pytest.raises(FileNotFoundError, match="ingest.source"):
        sources.detect_source_kind(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ingest.source_type"):
        sources.detect_source_kind(str(tmp_path), "nonsense")


@pytest.mark.integration
def test_ingest_stage_runs_chunked_on_ray(ray_local, tmp_path, make_ctx):
    root = build_corrupt_folder(tmp_path / "src")
    ctx = make_ctx("ingest")
    counts = ingest.run(data_cfg(**{"ingest.source": str(root), "ingest.chunk_size": 8}), ctx)
    assert counts["kept"] == len(EXPECTED) and counts["rejected"] == 0 and counts["chunks"] == 3
    stage_dir = ctx.stage_dir("ingest")
    assert len(records.list_parts(stage_dir)) == 3
    assert storage.read_json(storage.join(stage_dir, "_SUCCESS"))["kept"] == len(EXPECTED)
    keys = records.read_tables(records.list_parts(stage_dir), records.INGEST_SCHEMA, ["key"]).column("key").to_pylist()
    assert keys == sorted(EXPECTED)  # chunks follow the sorted listing


def test_ingest_requires_source(make_ctx):
    with pytest.raises(ValueError, match="ingest.source"):
        ingest.run(data_cfg(), make_ctx("ingest"))


def test_resuming_from_another_source_is_refused(tmp_path, make_ctx):
    ctx = make_ctx("ingest")
    storage.write_json_atomic(storage.join(ctx.stage_dir("ingest"), ingest.SOURCE_INFO_NAME),
                              {"source": "/somewhere/else"})
    with pytest.raises(ValueError, match="data.name"):
        ingest.run(data_cfg(**{"ingest.source": str(tmp_path)}), ctx)
