"""A folder unit's image files read into one contiguous buffer, so the unit's Arrow image column wraps the bytes
instead of copying them.

Building a binary column from per-file ``bytes`` copies every image once more into fresh Arrow memory (page faults
included); with the bytes already side by side in key order, the column is the buffer plus offsets. A reader gives
each raw sample its view into the buffer (``image``) and the buffer; :func:`image_column` checks that the unit's
final rows still line up with the buffer and returns the zero-copy column, or None when they do not (a
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
        self.views: list[memoryview | None] = [None] * len(sizes)  # file i's bytes once read into its slice

    def read(self, index: int, path: str) -> memoryview | bytes:
        """The bytes of file ``index``: a view into the buffer, or plain ``bytes`` when the file changed size since
        it was listed (it no longer fits its slice)."""
        view = memoryview(self.data)[self.offsets[index]:self.offsets[index + 1]]
        with open(path, "rb", buffering=0) as f:
            filled = 0
            while filled < len(view):
                n = f.readinto(view[filled:])
                if not n:
                    break
                filled += n
            if filled == len(view) and not f.read(1):
                self.views[index] = view
                return view
        with open(path, "rb") as f:  # grew or shrank under us: its current content, outside the buffer
            return f.read()


def image_column(rows: Sequence[dict[str, Any]], raws: Sequence[dict[str, Any]]) -> pa.Array | None:
    """The binary image column of ``rows`` (final order) wrapping their readers' shared buffer, or None.

    ``raws[i]`` is the raw sample ``rows[i]`` was made from; row i must hold file i of the buffer (the buffer's own
    view of it, or None: rejected), so the buffer's offsets are the column's.
    """
    buffer = raws[0].get("image_buffer") if raws else None
    if (not isinstance(buffer, UnitBuffer) or len(rows) != len(raws) or len(raws) != len(buffer.views)
            or len(buffer.data) > _INT32_MAX):
        return None
    valid = np.empty(len(rows), dtype=bool)
    for i, (row, raw) in enumerate(zip(rows, raws)):
        view, image = buffer.views[i], row.get("image")
        # Not file i's slice (another order, or a file read outside the buffer), or replaced (re-encoded): copy.
        if view is None or raw.get("image") is not view or (image is not None and image is not view):
            return None
        valid[i] = image is not None
    sizes = np.diff(buffer.offsets)
    if sizes[~valid].sum() > MAX_REJECTED_SHARE * len(buffer.data):
        return None
    nulls = int(len(rows) - valid.sum())
    # A null slot may span bytes (Arrow's layout allows it): a rejected input's bytes stay where they are, unread.
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    offsets = pa.py_buffer(buffer.offsets.astype(np.int32))
    return pa.Array.from_buffers(pa.binary(), len(rows), [bitmap, offsets, pa.py_buffer(buffer.data)],
                                 null_count=nulls)
