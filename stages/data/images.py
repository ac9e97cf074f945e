"""Image bytes: header probing, payload sniffing, the decode check, and decoding to upright RGB.

Everything here is pure (bytes in, values out) and shared by the streaming pass, the metadata passes, the training
loader (``decode_rgb``) and the benchmarks' baseline loop.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageFile, UnidentifiedImageError

# EXIF orientations 5-8 rotate by 90° or 270°: the displayed image has height and width swapped.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
DECODE_CHECKS = ("reduced", "full")


@contextlib.contextmanager
def pil_strict_and_unbounded() -> Iterator[None]:
    """PIL with its decompression-bomb check off (we check `filter.max_pixels` ourselves, from the header) and with
    truncated files raising instead of being padded with grey."""
    old_max, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_max, old_truncated


@dataclass(frozen=True)
class ImageHeader:
    format: str | None
    height: int | None  # displayed (EXIF-corrected) height
    width: int | None
    orientation: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _header_of(img: Image.Image) -> ImageHeader:
    width, height = img.size
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block does not make the image unusable
        orientation = 1
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(img.format, int(height), int(width), orientation)


def _open_error(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "PIL cannot identify the image format"
    return f"{type(err).__name__}: {err}"


def probe_image(data: bytes | None) -> ImageHeader:
    """Format and EXIF-corrected size from the header only (`Image.open` is lazy: no pixel is decoded)."""
    if not data:
        return ImageHeader(None, None, None, 1, "empty payload")
    with pil_strict_and_unbounded():
        try:
            with Image.open(io.BytesIO(data)) as img:
                return _header_of(img)
        except (OSError, ValueError, SyntaxError) as err:
            return ImageHeader(None, None, None, 1, _open_error(err))


_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
)
IMAGE_MAGIC_LABELS = {"jpeg", "png", "gif", "bmp", "tiff", "webp"}


def sniff_payload(data: bytes | memoryview | None) -> str:
    """A coarse label for a payload: an image format name by magic bytes, 'empty', 'html', 'text' or 'binary'."""
    if not data:
        return "empty"
    data = bytes(data[:4096])  # all it looks at; also turns a memoryview (unit_buffer.py) into bytes
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    head = data[:1024].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "html"
    try:
        data[:4096].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


def check_image(data: bytes | None, max_pixels: int,
                decode: str = "reduced") -> tuple[ImageHeader, str | None, str]:
    """(header, reject reason or None, detail) from one open of the bytes: header, pixel budget, then a decode.

    ``decode="reduced"`` decodes JPEGs with libjpeg's DCT scaling (1/8 of each side): the entropy decoder still reads
    every coefficient of the file, so truncated or corrupt data fails exactly as in a full decode, at a fraction of
    the cost. Other formats are always decoded in full. ``decode="full"`` decodes every pixel.
    """
    if decode not in DECODE_CHECKS:
        raise ValueError(f"filter.decode_check must be one of {DECODE_CHECKS}, got {decode!r}")
    if not data:
        return ImageHeader(None, None, None, 1, "empty payload"), "undecodable", "empty: empty payload"
    with pil_strict_and_unbounded():
        try:
            with Image.open(io.BytesIO(data)) as img:
                header = _header_of(img)
                if header.height <= 0 or header.width <= 0:
                    return header, "undecodable", f"header declares an empty image ({header.width}x{header.height})"
                pixels = header.height * header.width
                if pixels > max_pixels:
                    return header, "decompression_bomb", (f"{header.width}x{header.height} = {pixels} pixels > "
                                                          f"{max_pixels}")
                try:
                    if decode == "reduced" and img.format in ("JPEG", "MPO"):
                        img.draft("RGB", (1, 1))
                    img.load()
                except Exception as err:  # any decoder failure means the bytes cannot be trained on
                    return header, "undecodable", f"{type(err).__name__}: {err}"
                return header, None, ""
        except (OSError, ValueError, SyntaxError) as err:
            header = ImageHeader(None, None, None, 1, _open_error(err))
    label = sniff_payload(data)
    if label in IMAGE_MAGIC_LABELS:
        return header, "undecodable", f"{label}: {header.error}"
    return header, "not_an_image", f"payload looks like {label}"


def to_rgb(img: Image.Image) -> Image.Image:
    """An upright RGB copy of a decoded image: EXIF rotation applied; palette, alpha (on white), CMYK and 16-bit
    modes converted."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bit by the value range, not by clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def decode_rgb(data: bytes, max_side: int | None = None) -> Image.Image:
    """Decode ``data`` to upright RGB, shrunk so its longer side is at most ``max_side`` (None: full size).

    With ``max_side``, JPEGs are decoded at the smallest DCT scale that still covers it (libjpeg's draft mode), so a
    model that wants 224 px does not pay for decoding 2000 px.
    """
    with pil_strict_and_unbounded():
        with Image.open(io.BytesIO(data)) as img:
            if max_side and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (max_side, max_side))
            img.load()
            rgb = to_rgb(img)
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return rgb


def reencode(data: bytes, fmt: str | None, max_side: int | None, jpeg_quality: int) -> tuple[bytes, str]:
    """Upright RGB re-encoding, shrunk to ``max_side`` when given: JPEG stays JPEG, anything else becomes PNG."""
    image = decode_rgb(data, max_side)
    out_format = "JPEG" if fmt in ("JPEG", "MPO") else "PNG"
    buf = io.BytesIO()
    image.save(buf, format=out_format, **({"quality": jpeg_quality} if out_format == "JPEG" else {}))
    return buf.getvalue(), out_format
