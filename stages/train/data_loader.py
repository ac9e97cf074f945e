"""The bucketed shard loader of the training stages: one bucket per step on every rank, disjoint samples per rank.

Plan (pure, deterministic from ``(loader.seed, start_step)``):
- the stage's samples (manifest after ``loader.filter`` / ``loader.top_k_by``) get a stage bucket (fixed
  ``resolution``² or the nearest-aspect bucket of the stage's table); small buckets are merged (bucket_schedule.py);
  with ``loader.weight_by`` a sample counts (and is streamed) as many times as its weight (sample_weights.py);
- each bucket's samples are permuted once by the seed and dealt round-robin to ranks (disjoint shares); each rank
  walks its share in a fresh seeded permutation every epoch, so position ``c`` of a bucket's stream is known without
  replaying the stream;
- at step ``s`` the schedule names the bucket; the rank takes the next ``accumulation × micro`` positions of its
  stream for it. A resumed run recomputes its cursors from the schedule's past (``occurrences_before``).
Decoding (tar member → RGB → Alg. 1 crop → tensor) runs in a thread pool a few micro-batches ahead; the order of
the output never depends on thread timing.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from sdxl.crops import bucket_crop_resize
from stages.train.bucket_schedule import BucketSchedule, build_schedule
from stages.train.data_manifest import (aesthetic_scores, dataset_dir_from_cfg, latent_cache_dir, select_samples,
                                        stage_buckets)
from stages.train.data_shards import LatentCacheReader, TarShardReader, sample_member
from stages.train.sample_weights import sample_repeats

log = logging.getLogger(__name__)

_SHARE_STREAM = 3  # seed-sequence tags, so the different random choices never share a stream
_EPOCH_STREAM = 5
_SAMPLE_STREAM = 7


@dataclass
class LoaderPlan:
    samples: pd.DataFrame  # selected manifest rows, sorted by key
    schedule: BucketSchedule
    shares: list[np.ndarray]  # per schedule bucket: this rank's row indices into ``samples``
    rank: int
    world_size: int
    micro_batch_size: int
    seed: int
    cache: LatentCacheReader | None = None  # cached mode: the latent cache the samples come from


@dataclass(frozen=True)
class MicroBatchPlan:
    step: int
    micro_index: int
    bucket: tuple[int, int]
    rows: np.ndarray
    sample_seeds: tuple[tuple[int, ...], ...]  # one seed sequence per sample (crop offset, caption choice)


def build_plan(cfg, rank: int, world_size: int, micro_batch_size: int) -> LoaderPlan:
    """Select samples, assign buckets, build the schedule and this rank's shares."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    lc = cfg.loader
    check_sizes(lc)
    samples = select_samples(cfg, dataset_dir_from_cfg(cfg))
    if len(samples) < world_size:
        raise ValueError(f"only {len(samples)} sample(s) selected from {samples.attrs.get('path')} for "
                         f"{world_size} ranks: every rank needs at least one (check loader.filter / loader.top_k_by)")
    cache = _open_cache(cfg, samples) if bool(lc.get("cached", False)) else None
    if cache is not None:  # cached latents have a fixed size: the bucket each sample was cropped to when cached
        buckets = [cache.bucket_of(k) for k in samples["key"]]
    else:
        buckets = stage_buckets(samples, int(lc.resolution), int(lc.bucket_multiple), bool(lc.multi_aspect),
                                bool(lc.require_table_match))
    repeats = sample_repeats(samples, lc.get("weight_by"))  # 1 per sample unless loader.weight_by is set
    counts: dict[tuple[int, int], int] = {}
    for b, n in zip(buckets, repeats):
        counts[b] = counts.get(b, 0) + int(n)
    seed = int(lc.seed)
    schedule = build_schedule(counts, micro_batch_size * world_size, seed)
    moved = sorted(f"{s[0]}x{s[1]}" for s, d in schedule.mapping.items() if s != d)
    if cache is not None and moved:
        cache.close()
        raise ValueError(f"cached buckets {moved} of {cache.cache_dir} hold fewer samples than one global micro-batch "
                         f"({micro_batch_size * world_size}) and cached latents cannot be re-cropped into another "
                         f"bucket: re-run stage=cache_latents with cache.min_bucket_samples="
                         f"{micro_batch_size * world_size}, or train with loader.cached=false")
    index_of = {b: i for i, b in enumerate(schedule.buckets)}
    members: list[list[int]] = [[] for _ in schedule.buckets]
    for row, (b, n) in enumerate(zip(buckets, repeats)):
        members[index_of[schedule.mapping[b]]].extend([row] * int(n))
    shares = []
    for j, rows in enumerate(members):
        dealt = np.random.default_rng([seed, _SHARE_STREAM, j]).permutation(np.asarray(rows, dtype=np.int64))
        share = dealt[rank::world_size]
        if len(share) == 0:  # only when the whole selection is one bucket smaller than world_size: caught above
            raise ValueError(f"rank {rank} owns no sample of bucket {schedule.buckets[j]}")
        shares.append(share)
    return LoaderPlan(samples, schedule, shares, rank, world_size, micro_batch_size, seed, cache)


def check_sizes(lc) -> None:
    """Pixel sizes must map to whole latents (the VAE downsamples by ``loader.latent_downsample``)."""
    down = int(lc.get("latent_downsample", 8))
    for name in ("resolution", "bucket_multiple"):
        value = int(lc[name])
        if value <= 0 or value % down:
            raise ValueError(f"loader.{name} must be a positive multiple of {down} (the VAE's downsampling), got {value}")


def _open_cache(cfg, samples: pd.DataFrame) -> LatentCacheReader:
    cache = LatentCacheReader(latent_cache_dir(cfg))
    missing = [k for k in samples["key"] if not cache.has(k)]
    if missing:
        cache.close()
        raise ValueError(f"{len(missing)} selected sample(s) (e.g. {missing[0]!r}) are not in the latent cache "
                         f"{cache.cache_dir}; re-run stage=cache_latents with the same loader settings")
    return cache


class _BucketStream:
    """Position ``c`` of a rank's endless walk over its share of one bucket (a new permutation each epoch)."""

    def __init__(self, share: np.ndarray, seed: int, bucket_index: int, rank: int):
        self.share, self.key = share, (seed, _EPOCH_STREAM, bucket_index, rank)
        self._epoch, self._order = -1, share

    def take(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for i, pos in enumerate(range(start, start + n)):
            epoch, within = divmod(pos, len(self.share))
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng([*self.key, epoch]).permutation(self.share)
            out[i] = self._order[within]
        return out


def plan_micro_batches(plan: LoaderPlan, start_step: int, accumulation: int) -> Iterator[MicroBatchPlan]:
    """Endless micro-batch plans from ``start_step`` on: ``accumulation`` of them per step, all of the step's bucket."""
    if accumulation <= 0 or start_step < 0:
        raise ValueError(f"accumulation must be positive and start_step >= 0, got {accumulation}, {start_step}")
    per_step = accumulation * plan.micro_batch_size
    cursors = plan.schedule.occurrences_before(start_step) * per_step
    streams = [_BucketStream(share, plan.seed, j, plan.rank) for j, share in enumerate(plan.shares)]
    for step in itertools.count(start_step):
        j = int(plan.schedule.bucket_indices(np.array([step]))[0])
        for a in range(accumulation):
            rows = streams[j].take(int(cursors[j]), plan.micro_batch_size)
            cursors[j] += plan.micro_batch_size
            seeds = tuple((plan.seed, _SAMPLE_STREAM, step, plan.rank, a, i) for i in range(len(rows)))
            yield MicroBatchPlan(step, a, plan.schedule.buckets[j], rows, seeds)


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes → RGB, EXIF orientation applied, transparency composited on white."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def original_size(row, image: Image.Image) -> tuple[int, int]:
    """c_size (Sec. 2.2): the original's (height, width) from the manifest (``orig_h``, ``orig_w``, EXIF-corrected at
    ingest), which a downscaled shard copy no longer has; the decoded image's size only where the manifest lacks it.
    (c_crop needs no such care: Alg. 1 crops after resizing the shorter side to the bucket, whatever the stored size.)
    """
    h, w = row.get("orig_h"), row.get("orig_w")
    if h is None or w is None or pd.isna(h) or pd.isna(w) or int(h) <= 0 or int(w) <= 0:
        return image.height, image.width
    return int(h), int(w)


def choose_caption(row, rng: np.random.Generator, synthetic_prob: float) -> str:
    """The synthetic caption with probability ``synthetic_prob`` when there is one, else the original (nulls → "")."""
    caption, synthetic = row.get("caption"), row.get("caption_synthetic")
    caption = caption if isinstance(caption, str) else ""
    synthetic = synthetic if isinstance(synthetic, str) else ""
    if synthetic and rng.random() < synthetic_prob:
        return synthetic
    return caption


class PixelSource:
    """Decodes one sample from the tar shards: image, Alg. 1 / bucket crop, caption choice."""

    def __init__(self, plan: LoaderPlan, cfg):
        self.records = plan.samples.to_dict("records")  # plain dicts: cheap to read from decoder threads
        self.reader = TarShardReader(dataset_dir_from_cfg(cfg))
        self.synthetic_prob = float(cfg.loader.synthetic_caption_prob)
        self.crop_mode = str(cfg.loader.get("crop_mode", "random"))
        self.aesthetic = aesthetic_scores(plan.samples)

    def load(self, row: int, bucket: tuple[int, int], seed: tuple[int, ...]) -> dict:
        rng = np.random.default_rng(list(seed))
        record = self.records[row]
        data = self.reader.image_bytes(str(record["shard"]), sample_member(record))
        try:
            image = decode_rgb(data)
        except Exception as err:  # a corrupt member is a data error: name it instead of failing deep in PIL
            raise ValueError(f"cannot decode sample {record['key']!r} in shard {record['shard']}: {err}") from err
        cropped, info = bucket_crop_resize(image, bucket, rng=rng, mode=self.crop_mode)
        return {"pixels": pil_to_tensor(cropped), "caption": choose_caption(record, rng, self.synthetic_prob),
                "original_size": original_size(record, image), "crop_coords": info.c_crop,
                "target_size": info.c_target,
                "aesthetic_score": float(self.aesthetic[row]), "key": str(record["key"])}

    def collate(self, items: list[dict], bucket: tuple[int, int]) -> dict:
        return {
            "pixels": torch.stack([it["pixels"] for it in items]),
            "captions": [it["caption"] for it in items],
            **_micro_cond(items),
            "bucket": tuple(bucket),
            "keys": [it["key"] for it in items],
        }

    def close(self) -> None:
        self.reader.close()


class LatentSource:
    """Reads one sample's cached VAE posterior, text embeddings and micro-conditioning (``loader.cached=true``)."""

    def __init__(self, plan: LoaderPlan, cfg):
        self.samples = plan.samples
        self.reader = plan.cache
        self.cache_dir = plan.cache.cache_dir
        self.aesthetic = aesthetic_scores(plan.samples)
        self.downsample = int(cfg.loader.get("latent_downsample", 8))

    def load(self, row: int, bucket: tuple[int, int], seed: tuple[int, ...]) -> dict:
        key = str(self.samples.iloc[row]["key"])
        cached = self.reader.sample(key)
        latent_hw = tuple(cached["latent_parameters"].shape[-2:])
        expected = (bucket[0] // self.downsample, bucket[1] // self.downsample)
        if latent_hw != expected:
            raise ValueError(f"cached latents of {key!r} in {self.cache_dir} are {latent_hw}, but this stage trains "
                             f"bucket {bucket} (latents {expected}): the cache was made for other loader settings")
        return {**cached, "key": key, "aesthetic_score": float(self.aesthetic[row]),
                "original_size": tuple(cached["original_size"].tolist()),
                "crop_coords": tuple(cached["crop_coords"].tolist()),
                "target_size": tuple(cached["target_size"].tolist())}

    def collate(self, items: list[dict], bucket: tuple[int, int]) -> dict:
        return {
            "latent_parameters": torch.stack([it["latent_parameters"] for it in items]).float(),
            "context": torch.stack([it["context"] for it in items]).float(),
            "pooled": torch.stack([it["pooled"] for it in items]).float(),
            **_micro_cond(items),
            "bucket": tuple(bucket),
            "keys": [it["key"] for it in items],
        }

    def close(self) -> None:
        self.reader.close()


def _micro_cond(items: list[dict]) -> dict:
    return {
        "original_size": torch.tensor([it["original_size"] for it in items], dtype=torch.long),
        "crop_coords": torch.tensor([it["crop_coords"] for it in items], dtype=torch.long),
        "target_size": torch.tensor([it["target_size"] for it in items], dtype=torch.long),
        "aesthetic_score": torch.tensor([it["aesthetic_score"] for it in items], dtype=torch.float32),
    }


def _prefetched(plans: Iterator[MicroBatchPlan], source, workers: int, depth: int) -> Iterator[dict]:
    """Decode ``depth`` micro-batches ahead on ``workers`` threads; yield them in plan order."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="shard-decode")
    pending: deque = deque()
    try:
        while True:
            while len(pending) < max(1, depth):
                mb = next(plans)
                futures = [pool.submit(source.load, int(r), mb.bucket, s) for r, s in zip(mb.rows, mb.sample_seeds)]
                pending.append((mb, futures))
            mb, futures = pending.popleft()
            batch = source.collate([f.result() for f in futures], mb.bucket)
            batch["step"] = mb.step  # lets a loss switch terms on at a step (the VAE's adversarial term)
            yield batch
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        source.close()


def make_batch_iterator(cfg, rank: int, world_size: int, micro_batch_size: int, start_step: int,
                        accumulation: int) -> Iterator[dict]:
    """Endless micro-batches for one rank; ``accumulation`` consecutive ones belong to each step from ``start_step``.

    Pixel mode yields {"pixels" [B,3,H,W] in [-1,1], "captions", "original_size" [B,2], "crop_coords" [B,2],
    "target_size" [B,2], "aesthetic_score" [B], "bucket" (h, w), "keys", "step"}; cached mode (``loader.cached``) yields
    "latent_parameters" [B,8,h,w] (VAE posterior mean ‖ logvar), "context", "pooled" instead of pixels/captions.
    """
    plan = build_plan(cfg, rank, world_size, micro_batch_size)
    source = LatentSource(plan, cfg) if bool(cfg.loader.get("cached", False)) else PixelSource(plan, cfg)
    log.info("loader rank %d/%d: %d samples, buckets %s", rank, world_size, len(plan.samples),
             {f"{h}x{w}": n for (h, w), n in zip(plan.schedule.buckets, plan.schedule.counts)})
    return _prefetched(plan_micro_batches(plan, start_step, accumulation), source,
                       int(cfg.loader.get("num_workers", 2)), int(cfg.loader.get("prefetch_micro_batches", 4)))
