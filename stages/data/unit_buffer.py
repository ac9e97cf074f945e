"""A folder unit's image files read into one contiguous buffer, so the unit's Arrow image column wraps the bytes
instead of copying them.

Building a binary column from per-file ``bytes`` copies every image once more into fresh Arrow memory (page faults
included); with the bytes already side by side in key order, the column is the buffer plus offsets. A reader gives
each raw sample a view into the buffer (``image``) and its place (``image_span``); :func:`image_column` checks that
the unit's final rows still line up with the buffer and returns the zero-copy column, or None when they do not (a
re-encoded image, an unexpected order, too many rejected bytes), in which case the caller copies as before.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

MAX_REJECTED_SHARE = 0.1  # rejected inputs' bytes ride along in the buffer; past this share, copy the kept ones
_INT32_MAX = 2**31 - 1  # a binary column's offsets are int32


class UnitBuffer:
    """The files at ``paths`` (sizes taken up front), read one at a time into their slice of one bytearray."""

    def __init__(self, paths: Sequence[str]):
        sizes = []
        for path in paths:
            try:
                sizes.append(os.stat(path).st_size)
            except OSError:
                sizes.append(0)  # read() then fails on it, as a plain read would
        self.offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.offsets[1:])
        self.data = bytearray(int(self.offsets[-1]))
        self._view = memoryview(self.data)

    def span(self, index: int) -> tuple[int, int]:
        return int(self.offsets[index]), int(self.offsets[index + 1])

    def read(self, index: int, path: str) -> memoryview | bytes:
        """The bytes of file ``index``: a view into the buffer, or plain ``bytes`` when the file changed size since
        it was listed (it no longer fits its slice)."""
        start, end = self.span(index)
        view = self._view[start:end]
        with open(path, "rb", buffering=0) as f:
            filled = 0
            while filled < len(view):
                n = f.readinto(view[filled:])
                if not n:
                    break
                filled += n
            if filled == len(view) and not f.read(1):
                return view
        with open(path, "rb") as f:  # grew or shrank under us: its current content, outside the buffer
            return f.read()


def image_column(rows: Sequence[dict[str, Any]], raws: Sequence[dict[str, Any]]) -> pa.Array | None:
    """The binary image column of ``rows`` (final order) wrapping their readers' shared buffer, or None.

    ``raws[i]`` is the raw sample ``rows[i]`` was made from. A row's image must be its raw sample's own view (or None:
    rejected); the raw samples' spans must tile the whole buffer in row order.
    """
    if not rows or len(rows) != len(raws):
        return None
    buffer = raws[0].get("image_buffer")
    if not isinstance(buffer, UnitBuffer) or len(buffer.data) > _INT32_MAX:
        return None
    offsets = np.empty(len(rows) + 1, dtype=np.int32)
    valid = np.empty(len(rows), dtype=bool)
    offsets[0], rejected_bytes = 0, 0
    for i, (row, raw) in enumerate(zip(rows, raws)):
        span, view = raw.get("image_span"), raw.get("image")
        if (raw.get("image_buffer") is not buffer or span is None or span[0] != offsets[i]
                or not isinstance(view, memoryview) or view.obj is not buffer.data):
            return None  # e.g. a file read outside the buffer (it changed size): its slice is not its bytes
        image = row.get("image")
        if image is not None and image is not view:
            return None  # re-encoded (or otherwise replaced): not the buffer's bytes
        offsets[i + 1], valid[i] = span[1], image is not None
        rejected_bytes += 0 if image is not None else span[1] - span[0]
    if offsets[-1] != len(buffer.data) or rejected_bytes > MAX_REJECTED_SHARE * len(buffer.data):
        return None
    nulls = int(len(rows) - valid.sum())
    # A null slot may span bytes (Arrow's layout allows it): a rejected input's bytes stay where they are, unread.
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.binary(), len(rows), [bitmap, pa.py_buffer(offsets), pa.py_buffer(buffer.data)],
                                 null_count=nulls)
