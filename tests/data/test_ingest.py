"""Ingest: header sizes with EXIF, caption normalisation, the streaming planner, reading folder/tar/parquet units."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from stages.data import ingest, plan, process, sources, stream
from tests.data import data_cfg, read_options
from tests.data.corrupt_inputs import EXPECTED, build_corrupt_folder, exif_rotated_jpeg


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
    assert process.normalize_caption(raw, max_chars=10) == (expected, flags)


def _folder_plan(tmp_path, chunk_size: int) -> list[dict]:
    writer = plan.PlanWriter(str(tmp_path / "plan"))
    plan.plan_folder(writer, str(tmp_path / "src"), chunk_size, sources.IMAGE_EXTENSIONS)
    writer.close({})
    return [plan.read_unit(part, group) for _, part, group in plan.unit_index(str(tmp_path / "plan"))]


def test_markers_and_hidden_files_are_not_counted_as_stray_inputs():
    names = ["_SUCCESS.json", ".DS_Store", "notes.md", "x.png", "x.json", "_y.png"]
    items, ignored = plan.folder_items("", names, sources.IMAGE_EXTENSIONS)
    assert ignored == 1  # notes.md only
    assert [item["rel"] for item in items] == ["x.png", "_y.png"]  # an image is ingested whatever its name


def test_folder_plan_keys_sidecars_collisions_and_order(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    for name in ("a/x.jpg", "a/x.png", "a/x.txt", "b.png", "b.json", "notes.md", "a0.jpg"):
        (tmp_path / "src" / name).write_bytes(b"")
    units = _folder_plan(tmp_path, chunk_size=2)
    items = [item for unit in units for item in unit["items"]]
    assert [u["unit"] for u in units] == [0, 1]
    assert [i["key"] for i in items] == ["a/x", "a/x.png", "a0", "b"]  # path order; the 2nd a/x keeps its extension
    assert items[1]["key_collision"] and items[0]["txt"] == items[1]["txt"] == "a/x.txt"
    assert items[3]["json"] == "b.json" and items[3]["txt"] is None
    info = storage.read_json(str(tmp_path / "plan" / plan.PLAN_INFO))
    assert info["units"] == 2 and info["planned_inputs"] == 4


def test_planning_ten_thousand_folders_holds_one_part(tmp_path):
    """The planner lists one folder at a time and flushes parts: a synthetic listing of 10⁴ folders × 20 files."""
    def lister(uri: str):
        rel = uri[len(str(tmp_path / "src")):].strip("/")
        if not rel:
            return [], [f"{i:05d}" for i in range(10_000)]
        return [(f"{j:03d}.jpg", 1) for j in range(20)], []

    writer = plan.PlanWriter(str(tmp_path / "plan"))
    counts = plan.plan_folder(writer, str(tmp_path / "src"), 1000, sources.IMAGE_EXTENSIONS, lister=lister)
    info = writer.close(counts)
    assert info["units"] == 200 and info["planned_inputs"] == 200_000
    assert len(records_parts(tmp_path / "plan")) >= 2  # parts flushed as they filled
    last = plan.read_unit(*list(plan.unit_index(str(tmp_path / "plan")))[-1][1:])
    assert last["items"][-1]["key"] == "09999/019"


def records_parts(folder):
    from stages.data import records

    return records.list_parts(str(folder), "units-")


def test_read_folder_unit_on_corrupt_inputs(tmp_path):
    root = build_corrupt_folder(tmp_path / "src")
    (unit,) = _folder_plan(tmp_path, chunk_size=1000)
    table = stream.read_unit_table(unit, read_options(), node="n1")
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == set(EXPECTED) and table.column("unit_size").to_pylist() == [len(EXPECTED)] * len(EXPECTED)
    outcome = {k: r["reject_reason"] or "kept" for k, r in rows.items()}
    assert outcome == EXPECTED
    flags = {k: json.loads(r["meta_json"]).get("flags", []) for k, r in rows.items() if r["meta_json"]}
    assert "caption_missing" in flags["caption_missing"] and rows["caption_missing"]["caption"] == ""
    assert "caption_invalid_utf8" in flags["caption_bad_utf8"] and "\ufffd" in rows["caption_bad_utf8"]["caption"]
    assert "caption_truncated" in flags["caption_long"] and len(rows["caption_long"]["caption"]) == 2000
    assert json.loads(rows["ok_jpeg"]["meta_json"])["sidecar"] == {"generator": "test", "seed": 2}
    assert rows["sub/nested"]["image"] == (root / "sub" / "nested.png").read_bytes()  # bytes as they are
    assert rows["bomb"]["image"] is None and rows["bomb"]["orig_h"] == 60000  # rejected rows carry no bytes
    assert rows["zero_bytes"]["reject_stage"] == "filter" and rows["zero_bytes"]["reject_detail"]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_and_parquet_units(tmp_path):
    jpeg = exif_rotated_jpeg(10, 20, orientation=1)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-0.tar").write_bytes(_tar([
        ("s1.jpg", jpeg), ("s1.txt", b"one"), ("s2.json", b'{"caption": "two"}'),
        ("s3.jpg", jpeg), ("s1.txt", b"again")]))  # s1 comes back after s3: a fault of the tar
    writer = plan.PlanWriter(str(tmp_path / "plan"))
    plan.plan_tars(writer, str(tmp_path / "shards"))
    pq.write_table(pa.table({"key": ["a", "b", "c"], "jpg": [jpeg, None, None], "caption": ["x", "y", "z"],
                             "status": ["success", "success", "failed_to_download"],
                             "error_message": [None, None, "HTTP Error 404: Not Found"]}),
                   tmp_path / "p.parquet", row_group_size=1)
    plan.plan_image_parquet(writer, str(tmp_path / "p.parquet"), chunk_size=2)
    writer.close({})
    units = [plan.read_unit(p, g) for _, p, g in plan.unit_index(str(tmp_path / "plan"))]
    assert [(u["kind"], u["row_groups"], u["start"], u["count"]) for u in units] == [
        ("webdataset", [], 0, 0), ("parquet", [0, 1], 0, 2), ("parquet", [2], 2, 1)]
    tar_rows = stream.read_unit_table(units[0], read_options()).to_pylist()
    assert [(r["key"], r["caption"], r["reject_reason"]) for r in tar_rows] == [
        ("shard-0/s1", "one", None), ("shard-0/s1#repeat1", None, "repeated_key"),
        ("shard-0/s2", None, "missing_image"), ("shard-0/s3", "", "duplicate")]  # s3 has s1's bytes
    rows = [r for u in units[1:] for r in stream.read_unit_table(u, read_options()).to_pylist()]
    assert [(r["key"], r["reject_reason"], r["orig_w"]) for r in rows] == [
        ("p/000000000", None, 20), ("p/000000001", "missing_image", None), ("p/000000002", "download_failed", None)]
    assert json.loads(rows[0]["meta_json"])["source_key"] == "a" and "404" in rows[2]["reject_detail"]


def test_detect_source_kind(tmp_path):
    build_corrupt_folder(tmp_path / "imgs")
    assert sources.detect_source_kind(str(tmp_path / "imgs")) == "folder"
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["c"]}), tmp_path / "urls.parquet")
    assert sources.detect_source_kind(str(tmp_path / "urls.parquet")) == "urls"
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    (tmp_path / "nested" / "deeper" / "list.jsonl").write_text('{"url": "http://x"}\n')
    assert sources.detect_source_kind(str(tmp_path / "nested")) == "urls"
    with pytest.raises(FileNotFoundError, match="ingest.source"):
        sources.detect_source_kind(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ingest.source_type"):
        sources.detect_source_kind(str(tmp_path), "nonsense")


def test_text_url_lists_are_planned_in_units_with_row_keys(tmp_path):
    lines = "".join(json.dumps({"url": f"http://h/{i}.jpg", "caption": f"c{i}", "license": "by"}) + "\n"
                    for i in range(5))
    (tmp_path / "urls.jsonl").write_text(lines)
    writer = plan.PlanWriter(str(tmp_path / "plan"))
    assert plan.plan_urls(writer, str(tmp_path / "urls.jsonl"), 2, "url", "caption")["urls"] == 5
    writer.close({})
    from stages.data import download

    units = [plan.read_unit(p, g) for _, p, g in plan.unit_index(str(tmp_path / "plan"))]
    requests = [r for u in units for r in download.unit_requests(u, download.DownloadOptions())]
    assert [r["key"] for r in requests] == [f"{i:09d}" for i in range(5)]
    assert requests[3]["url"] == "http://h/3.jpg" and requests[3]["caption"] == "c3"
    assert requests[3]["meta"]["columns"] == {"license": "by", "url": "http://h/3.jpg"}
    (tmp_path / "bad.csv").write_text("link,caption\nhttp://x,y\n")
    with pytest.raises(ValueError, match="ingest.download.url_column"):
        plan.plan_urls(plan.PlanWriter(str(tmp_path / "plan2")), str(tmp_path / "bad.csv"), 2, "url", "caption")


def test_ingest_stage_plans_without_ray(tmp_path, make_ctx):
    root = build_corrupt_folder(tmp_path / "src")
    ctx = make_ctx("ingest")
    info = ingest.run(data_cfg(**{"ingest.source": str(root), "ingest.chunk_size": 8}), ctx)
    assert info["units"] == 3 and info["planned_inputs"] == len(EXPECTED) and info["ignored_files"] == 1
    again = ingest.run(data_cfg(**{"ingest.source": str(root), "ingest.chunk_size": 8}), ctx)
    assert again == info  # the plan is reused


def test_ingest_requires_source(make_ctx):
    with pytest.raises(ValueError, match="ingest.source"):
        ingest.run(data_cfg(), make_ctx("ingest"))


def test_resuming_from_another_source_is_refused(tmp_path, make_ctx):
    ctx = make_ctx("ingest")
    storage.write_json_atomic(storage.join(ctx.dataset_dir, plan.PLAN_DIR, plan.PLAN_INFO),
                              {"source": "/somewhere/else", "units": 0})
    with pytest.raises(ValueError, match="data.name"):
        ingest.run(data_cfg(**{"ingest.source": str(tmp_path)}), ctx)
