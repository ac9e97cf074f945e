"""A folder of awkward inputs for the data stages, and what each one must become.

`build_corrupt_folder(path)` writes the files; `EXPECTED` maps each key to the filter's reject reason or "kept";
`EXPECTED_SIZES` gives the EXIF-corrected (height, width) of kept images.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXPECTED = {
    "ok_jpeg": "kept",
    "sub/nested": "kept",
    "truncated": "undecodable",
    "zero_bytes": "undecodable",
    "text_as_jpg": "not_an_image",
    "html_as_png": "not_an_image",
    "bomb": "decompression_bomb",
    "cmyk": "kept",
    "deep16": "kept",
    "palette": "kept",
    "rgba": "kept",
    "exif_rotated": "kept",
    "small64": "kept",
    "aspect_1x4": "kept",
    "aspect_5x1": "aspect_out_of_range",
    "caption_missing": "kept",
    "caption_empty": "kept",
    "caption_bad_utf8": "kept",
    "caption_long": "kept",
    "dup_a": "kept",
    "dup_b": "duplicate",
}
EXPECTED_SIZES = {  # (orig_h, orig_w) after EXIF orientation
    "ok_jpeg": (96, 128), "cmyk": (48, 64), "deep16": (40, 56), "palette": (32, 48), "rgba": (72, 72),
    "exif_rotated": (120, 80), "small64": (64, 64), "aspect_1x4": (256, 64),
}
LONG_CAPTION = "a very long caption " * 250  # 5000 characters


def _noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` × ``height`` followed by a tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(stored_h: int, stored_w: int, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(_noise(stored_h, stored_w, 7)), "JPEG", exif=exif.tobytes())


def build_corrupt_folder(root: str | Path) -> Path:
    root = Path(root)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    rgb = lambda h, w, seed: Image.fromarray(_noise(h, w, seed))  # noqa: E731
    good_jpeg = _encode(rgb(256, 256, 1), "JPEG", quality=90)
    files: dict[str, bytes] = {
        "ok_jpeg.jpg": _encode(rgb(96, 128, 2), "JPEG"),
        "sub/nested.png": _encode(rgb(80, 80, 3), "PNG"),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "zero_bytes.jpg": b"",
        "text_as_jpg.jpg": b"this is a plain text file, not a picture\n" * 4,
        "html_as_png.png": b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>",
        "bomb.png": png_header_only(60000, 60000),
        "cmyk.jpg": _encode(Image.fromarray(_noise(48, 64, 4, 4), mode="CMYK"), "JPEG"),
        "deep16.png": _encode(Image.fromarray((np.arange(40 * 56, dtype=np.uint16).reshape(40, 56) * 20)), "PNG"),
        "palette.png": _encode(rgb(32, 48, 5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "rgba.png": _encode(Image.fromarray(_noise(72, 72, 6, 4), mode="RGBA"), "PNG"),
        "exif_rotated.jpg": exif_rotated_jpeg(80, 120),  # stored 80 high × 120 wide, displayed 120 × 80
        "small64.png": _encode(rgb(64, 64, 8), "PNG"),
        "aspect_1x4.png": _encode(rgb(256, 64, 9), "PNG"),  # width:height = 1:4 (h/w = 4, the edge bucket)
        "aspect_5x1.png": _encode(rgb(64, 320, 10), "PNG"),  # width:height = 5:1 (h/w = 0.2, out of range)
        "caption_missing.png": _encode(rgb(40, 40, 11), "PNG"),
        "caption_empty.png": _encode(rgb(40, 44, 12), "PNG"),
        "caption_bad_utf8.png": _encode(rgb(44, 40, 13), "PNG"),
        "caption_long.png": _encode(rgb(48, 40, 14), "PNG"),
        "dup_a.png": _encode(rgb(50, 50, 15), "PNG"),
    }
    files["dup_b.png"] = files["dup_a.png"]
    for name, data in files.items():
        (root / name).write_bytes(data)
        stem = name.rsplit(".", 1)[0]
        if stem != "caption_missing":
            (root / f"{stem}.txt").write_text(f"a picture called {stem}", encoding="utf-8")
    (root / "caption_empty.txt").write_bytes(b"")
    (root / "caption_bad_utf8.txt").write_bytes(b"caf\xe9 \xff\xfe broken")
    (root / "caption_long.txt").write_text(LONG_CAPTION, encoding="utf-8")
    (root / "ok_jpeg.json").write_text('{"generator": "test", "seed": 2}', encoding="utf-8")
    (root / "README.md").write_text("not a sample", encoding="utf-8")
    return root
