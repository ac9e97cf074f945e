"""A local folder unit's image column wraps the buffer its files were read into (no copy), and falls back to copying
whenever the rows no longer line up with it; either way the bytes are the files' bytes."""

from __future__ import annotations

import io
import os

import pyarrow as pa
from PIL import Image

from stages.data import process, sources
from stages.data.unit_buffer import UnitBuffer, image_column


def _jpeg(size: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 40 % 256, 90, 160)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (10, 200, 30)).save(buf, "BMP")  # not a tar format: re-encoded to PNG
    return buf.getvalue()


def _unit(root, files: dict[str, bytes]) -> dict:
    items = []
    for name in sorted(files):
        (root / name).write_bytes(files[name])
        items.append({"rel": name, "key": os.path.splitext(name)[0]})
    return {"kind": "folder", "uri": str(root), "unit": 0, "items": items}


def _table_and_buffer(unit: dict) -> tuple[pa.Table, UnitBuffer]:
    raws = list(sources.read_folder_unit(unit))
    return process.process_unit(raws, 0, process.SampleOptions()), raws[0]["image_buffer"]


def _values(table: pa.Table) -> dict[str, bytes | None]:
    return dict(zip(table.column("key").to_pylist(), table.column("image").to_pylist()))


def test_kept_images_are_the_read_buffer_itself(tmp_path):
    files = {f"img{i}.jpg": _jpeg(16 + i, i) for i in range(5)}
    table, buffer = _table_and_buffer(_unit(tmp_path, files))
    (chunk,) = table.column("image").chunks
    assert chunk.buffers()[2].address == pa.py_buffer(buffer.data).address  # zero copy
    assert _values(table) == {name[:-4]: data for name, data in files.items()}
    assert table.schema == process.records.SAMPLE_SCHEMA


def test_a_rejected_input_is_a_null_whose_bytes_stay_in_place(tmp_path):
    files = {f"img{i}.jpg": _jpeg(40, i) for i in range(8)}
    files["img3.jpg"] = files["img3.jpg"][:-600]  # truncated: rejected by the decode check
    table, buffer = _table_and_buffer(_unit(tmp_path, files))
    assert table.column("image").chunks[0].buffers()[2].address == pa.py_buffer(buffer.data).address
    values = _values(table)
    assert values.pop("img3") is None
    assert values == {name[:-4]: data for name, data in files.items() if name != "img3.jpg"}
    reasons = dict(zip(table.column("key").to_pylist(), table.column("reject_reason").to_pylist()))
    assert reasons["img3"] == "undecodable"


def test_copies_when_an_image_is_reencoded_or_rejects_dominate(tmp_path):
    (tmp_path / "a").mkdir()
    files = {"x0.jpg": _jpeg(20, 1), "x1.bmp": _bmp(), "x2.jpg": _jpeg(24, 2)}
    table, buffer = _table_and_buffer(_unit(tmp_path / "a", files))
    assert table.column("image").chunks[0].buffers()[2].address != pa.py_buffer(buffer.data).address
    values = _values(table)
    assert values["x0"] == files["x0.jpg"] and values["x2"] == files["x2.jpg"]
    assert Image.open(io.BytesIO(values["x1"])).format == "PNG"

    (tmp_path / "b").mkdir()
    files = {"y0.jpg": _jpeg(20, 1), "y1.jpg": b"<html>not an image</html>" * 400}
    table, buffer = _table_and_buffer(_unit(tmp_path / "b", files))
    (chunk,) = table.column("image").chunks
    assert chunk.buffers()[2].size == len(files["y0.jpg"])  # the rejected page is not carried along
    assert _values(table) == {"y0": files["y0.jpg"], "y1": None}


def test_a_file_that_changed_size_is_read_whole(tmp_path):
    first, second = tmp_path / "a.jpg", tmp_path / "b.jpg"
    first.write_bytes(_jpeg(20, 1))
    second.write_bytes(_jpeg(20, 2))
    buffer = UnitBuffer([str(first), str(second)])
    grown = _jpeg(60, 3)
    first.write_bytes(grown)  # changed after listing: no longer fits its slice
    assert bytes(buffer.read(0, str(first))) == grown and not isinstance(buffer.read(0, str(first)), memoryview)
    assert isinstance(buffer.read(1, str(second)), memoryview)
    raws = [{"key": "a", "image": buffer.read(0, str(first)), "image_buffer": buffer},
            {"key": "b", "image": buffer.read(1, str(second)), "image_buffer": buffer}]
    rows = [{"image": raw["image"]} for raw in raws]
    assert image_column(rows, raws) is None  # not the buffer's bytes: the caller copies


def test_a_unit_whose_file_changes_mid_read_keeps_every_files_bytes(tmp_path):
    files = {f"img{i}.jpg": _jpeg(20, i) for i in range(3)}
    unit = _unit(tmp_path, files)
    reader = sources.read_folder_unit(unit)
    raws = [next(reader)]  # the unit's sizes are taken now
    files["img1.jpg"] = _jpeg(64, 9)
    (tmp_path / "img1.jpg").write_bytes(files["img1.jpg"])
    raws += list(reader)
    assert raws[1]["image_buffer"] is None and raws[2]["image_buffer"] is not None
    table = process.process_unit(raws, 0, process.SampleOptions())
    assert _values(table) == {name[:-4]: data for name, data in files.items()}
