"""Small datasets in the data stages' output format (docs/architecture.md, "Data contracts"), written directly.

``write_dataset`` makes ``<dataset_dir>/shards/<H>x<W>/<H>x<W>-<nnnnn>.tar`` (members ``<member_key>.png`` +
``<member_key>.json``) and ``manifest.parquet`` with the records.MANIFEST_SCHEMA columns. Each image's pixels encode
its index, so tests can tell which sample a tensor came from.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from PIL import Image

from stages.data.records import MANIFEST_SCHEMA
from stages.train.data_loader import make_batch_iterator
from stages.train.data_shards import member_key


def _png(h: int, w: int, index: int) -> bytes:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_dataset(dataset_dir: str, bucket_counts: dict[tuple[int, int], int], per_shard: int = 4,
                  scores: bool = True, oversize: float = 1.5) -> list[dict]:
    """Write ``bucket_counts[(h, w)]`` samples per bucket; images are ``oversize`` × the bucket. Returns the rows."""
    rows = []
    index = 0
    for (bh, bw), count in sorted(bucket_counts.items()):
        name = f"{bh}x{bw}"
        folder = os.path.join(dataset_dir, "shards", name)
        os.makedirs(folder, exist_ok=True)
        for start in range(0, count, per_shard):
            shard_rel = f"shards/{name}/{name}-{start // per_shard:05d}.tar"
            with tarfile.open(os.path.join(dataset_dir, shard_rel), "w") as tar:
                for _ in range(start, min(start + per_shard, count)):
                    key = f"img/{name}/s.{index:04d}"
                    oh, ow = int(bh * oversize) + index % 3, int(bw * oversize)
                    mk = member_key(key)
                    row = {
                        "key": key, "shard": shard_rel, "member_key": mk, "bucket_h": bh, "bucket_w": bw,
                        "orig_h": oh, "orig_w": ow, "caption": f"caption {index}",
                        "caption_synthetic": f"synthetic {index}", "sha256": f"{index:064x}",
                        "clip_score": float(0.2 + 0.01 * index) if scores else None,
                        "aesthetic_score": float(3.0 + (index % 7)) if scores else None,
                        "watermark_prob": None, "nsfw_prob": None, "format": "PNG", "source": key,
                        "meta_json": "{}",
                    }
                    _add(tar, f"{mk}.png", _png(oh, ow, index))
                    _add(tar, f"{mk}.json", json.dumps(row).encode())
                    rows.append(row)
                    index += 1
    table = pa.table({f.name: [r.get(f.name) for r in rows] for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)
    pq.write_table(table, os.path.join(dataset_dir, "manifest.parquet"))
    return rows


def loader_cfg(dataset_dir: str, root: str | None = None, **loader_overrides):
    """A config with the sections the loader reads, loader values from pipeline/conf/loader/default.yaml."""
    here = os.path.dirname(__file__)
    defaults = OmegaConf.load(os.path.join(here, "..", "..", "pipeline", "conf", "loader", "default.yaml"))
    loader = OmegaConf.merge(defaults, {"dataset_dir": dataset_dir, "num_workers": 1, **loader_overrides})
    return OmegaConf.create({"paths": {"root": root or os.path.dirname(dataset_dir)}, "data": {"name": "default"},
                             "model": {"preset": "tiny"}, "loader": loader})


CONF_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf")


def stage_cfg(stage: str, root: str, preset: str = "tiny", overrides: list[str] | None = None):
    """The config a training stage sees, composed as Hydra does for the sections the tasks and loader read:
    model/loader defaults, then preset/<preset>.yaml, then the stage's own defaults (train_task/default.yaml),
    stage/<stage>.yaml, then ``overrides`` (dotlist)."""
    base = OmegaConf.create({
        "paths": {"root": root}, "data": {"name": "default"},
        "model": OmegaConf.load(os.path.join(CONF_DIR, "model", "default.yaml")),
        "loader": OmegaConf.load(os.path.join(CONF_DIR, "loader", "default.yaml")),
        "train": {},
    })
    stage_file = OmegaConf.load(os.path.join(CONF_DIR, "stage", f"{stage}.yaml"))
    included = [OmegaConf.load(os.path.join(CONF_DIR, entry.strip("/").split(":")[0].strip(), "default.yaml"))
                for entry in (f"{k}:{v}" for d in stage_file.pop("defaults", []) if isinstance(d, dict)
                              for k, v in d.items())]
    cfg = OmegaConf.merge(base, OmegaConf.load(os.path.join(CONF_DIR, "preset", f"{preset}.yaml")), *included,
                          stage_file, OmegaConf.from_dotlist(list(overrides or [])))
    OmegaConf.resolve(cfg)
    return cfg


# Three buckets, square and both orientations: what the task tests train on.
TASK_BUCKETS = {(64, 64): 6, (48, 80): 4, (80, 48): 4}


def first_batch(cfg, micro: int = 2) -> dict:
    """The first micro-batch the training loader gives rank 0 of 1 under ``cfg``."""
    return next(make_batch_iterator(cfg, 0, 1, micro, 0, 1))
