"""Atomic local writes, with no heavy imports: the data stages' processes import this through pipeline.storage and
must not pay for torch (see sdxl/checkpoint.py for the weights that use it)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def open_atomic_local(path: str) -> Iterator[BinaryIO]:
    """A binary file whose content appears at ``path`` only when the block ends without an error: a temp file beside
    it (``.tmp-`` prefix), fsync, then rename. Readers never see a partial file."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic_local(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`open_atomic_local`)."""
    with open_atomic_local(path) as stream:
        stream.write(data)
