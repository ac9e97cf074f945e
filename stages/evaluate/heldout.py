"""Held-out evaluation data: the validation split of a dataset's manifest and its reference images.

The split is a hash of the sample key (``sha256(key)`` read as a number in [0, 1) below ``val_fraction``), so it is
deterministic, needs no stored list, and a sample stays on its side when the manifest grows. Prompts are those
samples' captions; reference images are their images from the shards, resized to cover and center-cropped to the
evaluation size (the crop Alg. 1 would take with a centred offset).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from pipeline import storage

CAPTION_FIELDS = ("caption", "caption_synthetic")


def key_fraction(key: str) -> float:
    """A stable number in [0, 1) from the sample key."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def is_heldout(key: str, val_fraction: float) -> bool:
    return key_fraction(key) < val_fraction


def check_fraction(val_fraction: float) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 1:
        raise ValueError(f"evaluate.val_fraction must be in (0, 1], got {val_fraction!r}")
    return float(val_fraction)


@dataclass
class HeldOut:
    """The validation samples (manifest rows, sorted by key), their prompts and where they came from."""

    dataset_dir: str
    rows: pd.DataFrame
    prompts: list[str]


def heldout_samples(dataset_dir: str, val_fraction: float, limit: int | None = None,
                    caption_field: str = "caption") -> HeldOut:
    """The validation split of ``<dataset_dir>/manifest.parquet`` (at most ``limit`` samples, by key).

    A sample's prompt is its ``caption_field``, falling back to the other caption field when empty. Errors name the
    manifest and the setting to change when the split is empty."""
    from stages.train.data_manifest import read_manifest

    val_fraction = check_fraction(val_fraction)
    if caption_field not in CAPTION_FIELDS:
        raise ValueError(f"evaluate.caption_field must be one of {list(CAPTION_FIELDS)}, got {caption_field!r}")
    df = read_manifest(dataset_dir)
    rows = df[[is_heldout(k, val_fraction) for k in df["key"]]]
    if rows.empty:
        raise ValueError(f"no held-out sample in {storage.join(dataset_dir, 'manifest.parquet')} "
                         f"({len(df)} samples at evaluate.val_fraction={val_fraction}); raise evaluate.val_fraction")
    if limit is not None:
        rows = rows.head(int(limit))
    other = CAPTION_FIELDS[1 - CAPTION_FIELDS.index(caption_field)]
    prompts = []
    for row in rows.itertuples(index=False):
        text = getattr(row, caption_field, None) or (getattr(row, other, None) if other in rows.columns else None)
        prompts.append(str(text or ""))
    return HeldOut(dataset_dir=dataset_dir, rows=rows.reset_index(drop=True), prompts=prompts)


def iter_reference_batches(heldout: HeldOut, resolution: int, batch_size: int = 32,
                           rejects: list[dict] | None = None) -> Iterator[torch.Tensor]:
    """uint8 batches [n, 3, r, r] of the held-out images, each center-cropped to ``resolution``, read one batch at a
    time (a paper-scale reference set does not fit in memory at 1024 px).

    An image that cannot be read or decoded is left out and appended to ``rejects`` ({key, reason}), not dropped
    silently."""
    from torchvision.transforms.functional import pil_to_tensor

    from sdxl.crops import bucket_crop_resize
    from stages.data.sources import decode_rgb
    from stages.train.data_shards import TarShardReader

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rejects = rejects if rejects is not None else []
    reader = TarShardReader(heldout.dataset_dir)
    batch: list[torch.Tensor] = []
    try:
        for row in heldout.rows.itertuples(index=False):
            member = getattr(row, "member_key", None) or row.key
            try:
                image = decode_rgb(reader.image_bytes(str(row.shard), str(member)))
                cropped, _ = bucket_crop_resize(image, (resolution, resolution), mode="center")
            except (OSError, KeyError, ValueError) as err:
                rejects.append({"key": str(row.key), "reason": f"{type(err).__name__}: {err}"[:300]})
                continue
            batch.append(pil_to_tensor(cropped))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)
    finally:
        reader.close()


def load_reference_images(heldout: HeldOut, resolution: int) -> tuple[torch.Tensor, list[dict]]:
    """(all held-out images as uint8 [N, 3, r, r], rejects): :func:`iter_reference_batches` gathered (small sets)."""
    rejects: list[dict] = []
    batches = list(iter_reference_batches(heldout, resolution, 64, rejects))
    if not batches:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8), rejects
    return torch.cat(batches), rejects
