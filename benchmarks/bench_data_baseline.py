"""The baseline of the folder benchmark: one process, one loop, the data pipeline's per-image work and nothing else.

Per image, as `stage=data` does it (written independently of stages/data, with PIL, hashlib, tarfile and pyarrow):
read the file and its same-stem caption; open it once for the format, the EXIF-corrected size, the pixel budget and
the aspect range;
the decode check (JPEGs at libjpeg's 1/8 DCT scale, which still entropy-decodes every coefficient — the pipeline's
`filter.decode_check=reduced` default; other formats in full); sha256 of the bytes; the nearest App. I bucket; append
the bytes and a JSON metadata member to that bucket's tar (1000 samples per tar); one manifest row. At the end: the
manifest as parquet. No Ray, no plan, no rejects bookkeeping, no dedup, no stats or plots.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Any

from benchmarks.bench_data_tools import TreeMeter

SAMPLES_PER_SHARD = 1000
MAX_PIXELS = 178_956_970
MIN_ASPECT, MAX_ASPECT = 0.25, 4.0


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def measured_loop(source: str, out_dir: str) -> dict[str, Any]:
    with TreeMeter() as meter:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from PIL import Image, ImageFile

        from sdxl.buckets import bucket_name, bucket_table, nearest_bucket

        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        table = bucket_table(1024, 64)
        open_tars: dict[str, tuple[tarfile.TarFile, int, str]] = {}
        shard_count, rows = 0, []
        for folder, dirs, names in os.walk(source):
            dirs.sort()
            for name in sorted(names):
                if not name.endswith(".jpg"):
                    continue
                path = os.path.join(folder, name)
                key = os.path.relpath(path, source)[:-4].replace(os.sep, "/")
                with open(path, "rb") as f:
                    data = f.read()
                with open(path[:-4] + ".txt", "rb") as f:
                    caption = f.read().decode("utf-8").strip()
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
                    if int(img.getexif().get(0x0112, 1) or 1) in (5, 6, 7, 8):
                        w, h = h, w
                    fmt = img.format
                    if h * w > MAX_PIXELS or not MIN_ASPECT <= h / w <= MAX_ASPECT:
                        continue
                    if fmt == "JPEG":
                        img.draft("RGB", (1, 1))
                    img.load()
                digest = hashlib.sha256(data).hexdigest()
                bucket = bucket_name(nearest_bucket(h, w, table))
                tar, count, shard = open_tars.get(bucket, (None, 0, ""))
                if tar is None:
                    shard = f"shards/{bucket}/{bucket}-{shard_count:05d}.tar"
                    os.makedirs(os.path.join(out_dir, "shards", bucket), exist_ok=True)
                    tar, count, shard_count = tarfile.open(os.path.join(out_dir, shard), "w"), 0, shard_count + 1
                stem = key.replace("/", "_").replace(".", "_")
                meta = {"key": key, "caption": caption, "orig_h": h, "orig_w": w, "bucket": bucket, "format": fmt,
                        "sha256": digest}
                _member(tar, f"{stem}.jpg", data)
                _member(tar, f"{stem}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                count += 1
                if count == SAMPLES_PER_SHARD:
                    tar.close()
                    open_tars.pop(bucket, None)
                else:
                    open_tars[bucket] = (tar, count, shard)
                rows.append({**meta, "shard": shard, "member_key": stem})
        for tar, _, _ in open_tars.values():
            tar.close()
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, "manifest.parquet"))
    return {**meter.report(), "kept": len(rows), "shards": shard_count}
