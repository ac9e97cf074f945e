import io
import itertools
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from sdxl.crops import bucket_crop_resize
from stages.train.data_loader import (build_plan, choose_caption, decode_rgb, make_batch_iterator, pil_to_tensor,
                                      plan_micro_batches)
from tests.train.shard_fixtures import loader_cfg, write_dataset

BUCKETS = {(64, 64): 10, (48, 80): 6, (80, 48): 5, (32, 128): 1}


@pytest.fixture
def dataset(tmp_path):
    path = str(tmp_path / "data" / "default")
    write_dataset(path, BUCKETS)
    return path


def take(it, n):
    return list(itertools.islice(it, n))


def test_every_micro_batch_is_one_bucket_of_the_stage_table(dataset):
    cfg = loader_cfg(dataset, multi_aspect=True, resolution=64, bucket_multiple=8)
    batches = take(make_batch_iterator(cfg, 0, 1, 2, 0, 2), 12)
    seen = set()
    for b in batches:
        h, w = b["bucket"]
        seen.add((h, w))
        assert b["pixels"].shape == (2, 3, h, w)
        assert b["pixels"].min() >= -1 and b["pixels"].max() <= 1
        assert (b["target_size"] == torch.tensor([h, w])).all()
        assert b["original_size"].shape == (2, 2) and b["crop_coords"].shape == (2, 2)
        assert len(b["captions"]) == 2 and b["aesthetic_score"].shape == (2,)
    # the two micro-batches of a step share the step's bucket
    for a, b in zip(batches[::2], batches[1::2]):
        assert a["bucket"] == b["bucket"]
    assert len(seen) >= 2


def test_fixed_size_stage_crops_everything_square(dataset):
    cfg = loader_cfg(dataset, multi_aspect=False, resolution=40)
    for b in take(make_batch_iterator(cfg, 0, 1, 3, 0, 1), 4):
        assert b["bucket"] == (40, 40) and b["pixels"].shape == (3, 3, 40, 40)
        # Alg. 1: only the longer axis is cropped
        assert ((b["crop_coords"][:, 0] == 0) | (b["crop_coords"][:, 1] == 0)).all()


def test_two_ranks_agree_on_buckets_and_get_disjoint_samples(dataset):
    cfg = loader_cfg(dataset, multi_aspect=True)
    r0 = take(make_batch_iterator(cfg, 0, 2, 2, 0, 1), 10)
    r1 = take(make_batch_iterator(cfg, 1, 2, 2, 0, 1), 10)
    assert [b["bucket"] for b in r0] == [b["bucket"] for b in r1]
    plan0, plan1 = build_plan(cfg, 0, 2, 2), build_plan(cfg, 1, 2, 2)
    for s0, s1 in zip(plan0.shares, plan1.shares):
        assert not set(s0) & set(s1)
    keys0 = {k for b in r0 for k in b["keys"]}
    keys1 = {k for b in r1 for k in b["keys"]}
    assert keys0 and keys1 and not keys0 & keys1


def test_resume_reproduces_the_uninterrupted_stream(dataset):
    cfg = loader_cfg(dataset, multi_aspect=True)
    full = take(make_batch_iterator(cfg, 0, 1, 2, 0, 2), 16)  # steps 0..7
    resumed = take(make_batch_iterator(cfg, 0, 1, 2, 5, 2), 6)  # steps 5..7
    for a, b in zip(full[10:], resumed):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["crop_coords"], b["crop_coords"])


def test_each_epoch_visits_every_sample_of_a_bucket_once(dataset):
    cfg = loader_cfg(dataset, multi_aspect=True)
    plan = build_plan(cfg, 0, 1, 1)
    plans = take(plan_micro_batches(plan, 0, 1), 400)
    j = plan.schedule.buckets.index((64, 64))
    rows = [int(p.rows[0]) for p in plans if p.bucket == (64, 64)]
    n = len(plan.shares[j])
    assert len(rows) >= 2 * n
    assert sorted(rows[:n]) == sorted(plan.shares[j].tolist()) == sorted(rows[n:2 * n])


def test_small_bucket_is_merged_not_starved(dataset):
    cfg = loader_cfg(dataset, multi_aspect=True)
    plan = build_plan(cfg, 0, 2, 2)
    assert (32, 128) not in plan.schedule.buckets
    assert sum(plan.schedule.counts) == sum(BUCKETS.values())
    assert all(len(s) >= 2 for s in plan.shares)


def test_filter_and_top_fraction_select_the_subset(dataset):
    cfg = loader_cfg(dataset, filter="aesthetic_score >= 7.0")
    plan = build_plan(cfg, 0, 1, 1)
    assert (plan.samples["aesthetic_score"] >= 7.0).all() and len(plan.samples) > 0
    cfg = loader_cfg(dataset, top_k_by={"columns": ["aesthetic_score", "clip_score"], "fraction": 0.25})
    plan = build_plan(cfg, 0, 1, 1)
    assert len(plan.samples) == 6  # ceil(0.25 * 22)
    assert plan.samples["aesthetic_score"].mean() > 6.0


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "key.str.len() > 2", "nonexistent > 1"])
def test_filter_rejects_code_and_unknown_columns(dataset, expr):
    with pytest.raises(ValueError, match="loader.filter"):
        build_plan(loader_cfg(dataset, filter=expr), 0, 1, 1)


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        build_plan(loader_cfg(str(tmp_path / "nothing")), 0, 1, 1)


def test_missing_shard_names_the_file(dataset):
    os.remove(os.path.join(dataset, "shards", "64x64", "64x64-00000.tar"))
    cfg = loader_cfg(dataset, multi_aspect=False, resolution=32)
    with pytest.raises(FileNotFoundError, match="64x64-00000.tar"):
        take(make_batch_iterator(cfg, 0, 1, 8, 0, 1), 4)


def test_corrupt_shard_names_the_file(dataset):
    with open(os.path.join(dataset, "shards", "48x80", "48x80-00000.tar"), "wb") as f:
        f.write(b"not a tar" * 100)
    cfg = loader_cfg(dataset, multi_aspect=False, resolution=32)
    with pytest.raises(ValueError, match="48x80-00000.tar"):
        take(make_batch_iterator(cfg, 0, 1, 8, 0, 1), 4)


def test_manifest_for_another_resolution_is_refused(dataset):
    cfg = loader_cfg(dataset, multi_aspect=True, resolution=256, bucket_multiple=64, require_table_match=True)
    with pytest.raises(ValueError, match="manifest.parquet.*loader.resolution=256"):
        build_plan(cfg, 0, 1, 1)
    # without the requirement the manifest's buckets map by aspect onto the 256 table
    cfg = loader_cfg(dataset, multi_aspect=True, resolution=256, bucket_multiple=64)
    buckets = set(build_plan(cfg, 0, 1, 1).schedule.buckets)
    assert buckets <= {(256, 256), (192, 320), (320, 192), (128, 512), (192, 256), (256, 192), (128, 448)}


def test_more_ranks_than_samples_is_a_clear_error(dataset):
    cfg = loader_cfg(dataset, filter="aesthetic_score >= 9.0")
    with pytest.raises(ValueError, match="every rank needs at least one"):
        build_plan(cfg, 0, 64, 1)


def test_synthetic_caption_probability(dataset):
    cfg = loader_cfg(dataset, synthetic_caption_prob=0.0)
    caps = [c for b in take(make_batch_iterator(cfg, 0, 1, 4, 0, 1), 3) for c in b["captions"]]
    assert all(c.startswith("caption") for c in caps)
    cfg = loader_cfg(dataset, synthetic_caption_prob=1.0)
    caps = [c for b in take(make_batch_iterator(cfg, 0, 1, 4, 0, 1), 3) for c in b["captions"]]
    assert all(c.startswith("synthetic") for c in caps)


def test_pixels_are_the_sample_image_cropped(dataset):
    cfg = loader_cfg(dataset, multi_aspect=False, resolution=40, crop_mode="center")
    batch = next(make_batch_iterator(cfg, 0, 1, 2, 0, 1))
    for key, pixels, size in zip(batch["keys"], batch["pixels"], batch["original_size"]):
        row = build_plan(cfg, 0, 1, 1).samples.set_index("key").loc[key]
        with tarfile.open(os.path.join(dataset, row["shard"])) as tar:
            data = tar.extractfile(f"{row['member_key']}.png").read()
        image = decode_rgb(data)
        assert tuple(size.tolist()) == (image.height, image.width) == (row["orig_h"], row["orig_w"])
        expected = pil_to_tensor(bucket_crop_resize(image, (40, 40), mode="center")[0])
        assert torch.equal(pixels, expected)


def _downscaled_dataset(root: str):
    """Shards whose stored images are smaller than the manifest's original sizes (as after the buckets stage's
    max_side): (dataset dir, manifest indexed by key, stored (h, w) per key)."""
    import pyarrow.parquet as pq

    path = os.path.join(root, "data", "default")
    write_dataset(path, {(64, 64): 4})
    manifest = pq.read_table(os.path.join(path, "manifest.parquet")).to_pandas()
    stored = dict(zip(manifest["key"], zip(manifest["orig_h"], manifest["orig_w"])))
    manifest["orig_h"] *= 4
    manifest["orig_w"] *= 3
    pq.write_table(pa.Table.from_pandas(manifest, preserve_index=False), os.path.join(path, "manifest.parquet"))
    return path, manifest.set_index("key"), stored


def test_size_conditioning_is_the_manifest_original_size_of_a_downscaled_shard(tmp_path):
    """c_size is the original's size from the manifest (orig_h, orig_w), not the stored image's; the crop is still
    taken from the stored pixels."""
    path, originals, stored = _downscaled_dataset(str(tmp_path))
    cfg = loader_cfg(path, multi_aspect=False, resolution=40, crop_mode="center")
    batch = next(make_batch_iterator(cfg, 0, 1, 4, 0, 1))
    for key, size, crop in zip(batch["keys"], batch["original_size"], batch["crop_coords"]):
        assert tuple(size.tolist()) == (originals.loc[key, "orig_h"], originals.loc[key, "orig_w"])
        assert tuple(size.tolist()) != stored[key]
        assert tuple(crop.tolist()) == bucket_crop_resize(Image.new("RGB", stored[key][::-1]), (40, 40),
                                                          mode="center")[1].c_crop


def test_latent_cache_records_the_manifest_original_size(tmp_path):
    from omegaconf import OmegaConf

    from stages.train.cache_latents import CacheActor, plan_cache
    from tests.train.shard_fixtures import stage_cfg

    _, originals, _ = _downscaled_dataset(str(tmp_path))
    cfg = stage_cfg("cache_latents", str(tmp_path), overrides=["loader.resolution=32"])
    actor = CacheActor(OmegaConf.to_container(cfg, resolve=True), "cpu")
    for item in plan_cache(cfg):
        actor.process(item)
    batch = next(make_batch_iterator(stage_cfg("pretrain256", str(tmp_path), overrides=[
        "loader.cached=true", "loader.resolution=32"]), 0, 1, 4, 0, 1))
    for key, size in zip(batch["keys"], batch["original_size"]):
        assert tuple(size.tolist()) == (originals.loc[key, "orig_h"], originals.loc[key, "orig_w"])


def test_null_captions_become_empty_strings():
    rng = np.random.default_rng(0)
    assert choose_caption({"caption": None, "caption_synthetic": None}, rng, 0.5) == ""
    assert choose_caption({"caption": float("nan"), "caption_synthetic": "s"}, rng, 1.0) == "s"
    assert choose_caption({"caption": "c", "caption_synthetic": float("nan")}, rng, 1.0) == "c"


def test_reader_uses_the_manifest_member_key(tmp_path):
    # the data stage makes clashing member names unique with a suffix: the manifest's member_key must be used
    path = str(tmp_path / "ds")
    rows = write_dataset(path, {(64, 64): 2})
    shard = os.path.join(path, rows[0]["shard"])
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            stem, ext = name.rsplit(".", 1)
            info = tarfile.TarInfo(f"{stem}_1.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(path, "manifest.parquet")).to_pandas()
    table["member_key"] = table["member_key"] + "_1"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), os.path.join(path, "manifest.parquet"))
    batch = next(make_batch_iterator(loader_cfg(path, resolution=32), 0, 1, 2, 0, 1))
    assert sorted(batch["keys"]) == sorted(r["key"] for r in rows)


def test_filter_on_an_unscored_manifest_says_so(tmp_path):
    path = str(tmp_path / "ds")
    write_dataset(path, {(64, 64): 3}, scores=False)
    with pytest.raises(ValueError, match=r"\['aesthetic_score'\] that have no values.*loader.filter=null"):
        build_plan(loader_cfg(path, filter="aesthetic_score >= 5.0"), 0, 1, 1)
    with pytest.raises(ValueError, match=r"top_k_by column 'clip_score' has no values"):
        build_plan(loader_cfg(path, top_k_by={"columns": ["clip_score"], "fraction": 0.5}), 0, 1, 1)


@pytest.mark.parametrize("key,value", [("resolution", 100), ("bucket_multiple", 4), ("resolution", 0)])
def test_sizes_must_be_whole_latents(dataset, key, value):
    with pytest.raises(ValueError, match=f"loader.{key} must be a positive multiple of 8"):
        build_plan(loader_cfg(dataset, **{key: value}), 0, 1, 1)
