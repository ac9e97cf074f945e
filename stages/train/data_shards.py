"""Random access into the data stages' WebDataset tars and into the latent-cache safetensors files.

Both formats are read by byte offset (``read_at``), local or on an object store through pyarrow filesystems: a tar is
indexed once (member name -> data offset, size) and a safetensors header gives each tensor's offsets. Random access
lets the loader pick any sample of any step, which is what makes resuming at step ``s`` exact. ``read_at`` is
positional, so decoder threads share one open file per shard.
"""

from __future__ import annotations

import json
import posixpath
import struct
import tarfile
import threading

import torch

from pipeline import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def member_key(key: str) -> str:
    """The WebDataset-safe member stem of a sample key (``.`` and ``/`` become ``_``)."""
    return key.replace(".", "_").replace("/", "_")


def sample_member(record) -> str:
    """A manifest row's member stem: its ``member_key`` column (the data stage makes clashing names unique with a
    suffix), else the stem derived from the key."""
    stem = record.get("member_key")
    return stem if isinstance(stem, str) and stem else member_key(str(record["key"]))


class _OpenFiles:
    """One random-access handle per path, opened on first use; errors name the file."""

    def __init__(self):
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, uri: str):
        with self._lock:
            handle = self._files.get(uri)
            if handle is None:
                if not storage.is_file(uri):
                    raise FileNotFoundError(f"shard file not found: {uri} (listed in the manifest; "
                                            f"was the dataset folder moved or partly deleted?)")
                fs, path = storage.resolve(uri)
                handle = fs.open_input_file(path)
                self._files[uri] = handle
            return handle

    def close(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()


class TarShardReader:
    """Image bytes of a sample, by shard path (relative to the dataset folder) and member key."""

    def __init__(self, dataset_dir: str):
        self.dataset_dir = dataset_dir
        self._files = _OpenFiles()
        self._index: dict[str, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def _members(self, shard: str) -> dict[str, tuple[int, int]]:
        with self._lock:
            index = self._index.get(shard)
        if index is not None:
            return index
        uri = storage.join(self.dataset_dir, *shard.split("/"))
        self._files.get(uri)  # opens the shared handle; a missing shard fails here, naming the file
        index = {}
        try:
            # A private handle for the header scan: tarfile seeks, while decoder threads use read_at on the shared one.
            fs, path = storage.resolve(uri)
            with fs.open_input_file(path) as scan, tarfile.open(fileobj=scan, mode="r:") as tar:
                for info in tar:
                    if info.isfile():
                        index[info.name] = (info.offset_data, info.size)
        except tarfile.TarError as err:
            raise ValueError(f"shard {uri} is not a readable tar file: {err}") from None
        with self._lock:
            self._index[shard] = index
        return index

    def image_bytes(self, shard: str, stem: str, offset: int | None = None, size: int | None = None) -> bytes:
        """The image member ``<stem>.<image ext>`` of ``shard`` (see :func:`sample_member`).

        With the manifest's ``image_offset`` / ``image_size`` the bytes are read directly (one ranged read, no scan
        of the tar's headers); without them the shard's headers are indexed on first use.
        """
        if offset is not None and size is not None and offset >= 0 and size >= 0:
            uri = storage.join(self.dataset_dir, *shard.split("/"))
            return self._files.get(uri).read_at(int(size), int(offset))
        members = self._members(shard)
        for ext in IMAGE_EXTENSIONS:
            hit = members.get(f"{stem}.{ext}")
            if hit is not None:
                offset, size = hit
                uri = storage.join(self.dataset_dir, *shard.split("/"))
                return self._files.get(uri).read_at(size, offset)
        raise KeyError(f"sample member {stem}.<image ext> is not in shard "
                       f"{storage.join(self.dataset_dir, *shard.split('/'))}")

    def record_image_bytes(self, record) -> bytes:
        """The image bytes of a manifest row: by its byte offset when the manifest has one, else by member name."""
        offset, size = record.get("image_offset"), record.get("image_size")
        known = offset is not None and size is not None and offset == offset and size == size  # NaN-safe
        return self.image_bytes(str(record["shard"]), sample_member(record), int(offset) if known else None,
                                int(size) if known else None)

    def close(self) -> None:
        self._files.close()


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "U8": torch.uint8}


class SafetensorsRows:
    """Row ``i`` of every tensor in a safetensors file whose tensors are stacked along dim 0 (one row per sample)."""

    def __init__(self, uri: str, handle):
        self.uri = uri
        self._handle = handle
        (header_len,) = struct.unpack("<Q", handle.read_at(8, 0))
        header = json.loads(handle.read_at(header_len, 8))
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self._base = 8 + header_len
        self.tensors = header
        self.keys: list[str] = json.loads(self.metadata.get("keys", "[]"))
        self.row_of = {k: i for i, k in enumerate(self.keys)}

    def row(self, name: str, index: int) -> torch.Tensor:
        spec = self.tensors[name]
        shape = spec["shape"]
        begin, end = spec["data_offsets"]
        row_bytes = (end - begin) // shape[0]
        raw = self._handle.read_at(row_bytes, self._base + begin + index * row_bytes)
        dtype = _SAFETENSORS_DTYPES[spec["dtype"]]
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape[1:]).clone()


class LatentCacheReader:
    """Per-sample rows of the cached latent shards (see stages/train/cache_latents.py) by key."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self._files = _OpenFiles()
        self._by_key: dict[str, tuple[SafetensorsRows, int]] = {}
        self._bucket_of_file: dict[str, tuple[int, int]] = {}
        files = storage.list_files(cache_dir, suffix=".safetensors", recursive=True)
        shards = [f for f in files if not posixpath.basename(f.replace("\\", "/")).startswith("_")]
        if not shards:
            raise FileNotFoundError(f"no latent cache shards under {cache_dir} (run `stage=cache_latents` with the "
                                    f"same loader settings first, or set loader.cached=false)")
        for uri in shards:
            rows = SafetensorsRows(uri, self._files.get(uri))
            h, w = (int(v) for v in rows.metadata.get("bucket", "0x0").split("x"))
            if h <= 0 or w <= 0:
                raise ValueError(f"latent cache file {uri} has no bucket in its metadata; re-run stage=cache_latents")
            self._bucket_of_file[uri] = (h, w)
            for key, i in rows.row_of.items():
                self._by_key[key] = (rows, i)

    def has(self, key: str) -> bool:
        return key in self._by_key

    def bucket_of(self, key: str) -> tuple[int, int]:
        """The (height, width) in pixels the sample was cropped to when cached."""
        try:
            return self._bucket_of_file[self._by_key[key][0].uri]
        except KeyError:
            raise KeyError(f"sample {key!r} is not in the latent cache {self.cache_dir}; re-run stage=cache_latents") from None

    def sample(self, key: str) -> dict[str, torch.Tensor]:
        try:
            rows, i = self._by_key[key]
        except KeyError:
            raise KeyError(f"sample {key!r} is not in the latent cache {self.cache_dir}; re-run stage=cache_latents") from None
        return {name: rows.row(name, i) for name in rows.tensors}

    def close(self) -> None:
        self._files.close()


def read_safetensors_file(uri: str) -> dict[str, torch.Tensor]:
    """All tensors of a (small) safetensors file, local or remote."""
    from safetensors.torch import load

    return load(storage.read_bytes(uri))
