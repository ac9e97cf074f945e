import itertools
import os

import pytest
import torch
from omegaconf import OmegaConf

from sdxl.presets import get_preset
from stages.train.cache_latents import CacheActor, _check_or_write_info, cache_identity, plan_cache, run
from stages.train.data_loader import build_plan, make_batch_iterator
from stages.train.data_manifest import latent_cache_dir
from stages.train.tasks import make_task
from tests.train.shard_fixtures import stage_cfg, write_dataset

BUCKETS = {(64, 64): 5, (48, 80): 4, (80, 48): 3, (32, 128): 1}
ASPECT = ["loader.multi_aspect=true", "loader.resolution=64", "cache.min_bucket_samples=2"]


@pytest.fixture
def root(tmp_path):
    write_dataset(str(tmp_path / "data" / "default"), BUCKETS)
    return str(tmp_path)


def fill_cache(cfg) -> list[dict]:
    """What the Ray actors do, in-process: plan, identity check, encode every pending shard."""
    items = plan_cache(cfg)
    _check_or_write_info(latent_cache_dir(cfg), cache_identity(cfg))
    actor = CacheActor(OmegaConf.to_container(cfg, resolve=True), "cpu")
    return [actor.process(it) for it in items]


def test_cache_is_written_once_and_read_by_the_cached_loader(root):
    cfg = stage_cfg("cache_latents", root, overrides=ASPECT)
    written = fill_cache(cfg)
    assert sum(written) == sum(BUCKETS.values())
    assert fill_cache(cfg) == [0] * len(written)  # resumable: existing files are skipped
    cache_dir = latent_cache_dir(cfg)
    assert os.path.isfile(os.path.join(cache_dir, "_uncond.safetensors"))
    # the lone 32x128 sample was merged at cache time into its nearest-aspect bucket
    assert not os.path.exists(os.path.join(cache_dir, "32x128"))

    train = stage_cfg("finetune_aspect", root, overrides=ASPECT + ["loader.cached=true", "train.init_from=null"])
    assert latent_cache_dir(train) == cache_dir
    batches = list(itertools.islice(make_batch_iterator(train, 0, 1, 2, 0, 1), 6))
    for b in batches:
        h, w = b["bucket"]
        down = get_preset("tiny").vae_downsample
        assert b["latent_parameters"].shape == (2, 8, h // down, w // down)
        assert b["context"].shape == (2, 77, 96) and b["pooled"].shape == (2, 64)
        assert (b["target_size"] == torch.tensor([h, w])).all()
    task = make_task(train)
    model = task.build_model()
    task.setup(torch.device("cpu"))
    loss, metrics = task.loss(model, batches[0], torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    # the refiner reads the same cache: bigG part of the context, aesthetic-score micro-conditioning
    refiner_cfg = stage_cfg("train_refiner", root, overrides=ASPECT + ["loader.cached=true", "loader.filter=null"])
    refiner = make_task(refiner_cfg)
    refiner.setup(torch.device("cpu"))
    cond = refiner._conditioning(batches[0], torch.Generator().manual_seed(0))
    assert cond.context.shape == (2, 77, 64) and cond.time_ids.shape == (2, 5)
    loss, _ = refiner.loss(refiner.build_model(), batches[0], torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_cached_latents_match_a_fresh_encoding_of_the_recorded_crop(root):
    cfg = stage_cfg("cache_latents", root)
    fill_cache(cfg)
    cached = next(make_batch_iterator(stage_cfg("pretrain256", root, overrides=["loader.cached=true"]), 0, 1, 1, 0, 1))
    key = cached["keys"][0]
    from sdxl.crops import crop, resize, cover_size
    from stages.train.data_loader import decode_rgb, pil_to_tensor
    from stages.train.data_shards import TarShardReader
    from stages.train.task_components import build_frozen_vae, encode_posterior

    plan = build_plan(stage_cfg("pretrain256", root), 0, 1, 1)
    row = plan.samples.set_index("key").loc[key]
    image = decode_rgb(TarShardReader(os.path.join(root, "data", "default")).image_bytes(row["shard"], row["member_key"]))
    top, left = (int(v) for v in cached["crop_coords"][0])
    resized = resize(image, cover_size((image.height, image.width), (64, 64)))
    pixels = pil_to_tensor(crop(resized, top, left, 64, 64))[None]
    vae, _ = build_frozen_vae(cfg, torch.device("cpu"))
    fresh = encode_posterior(vae, pixels)
    assert torch.allclose(cached["latent_parameters"], fresh, atol=2e-2, rtol=1e-2)


def test_cache_with_other_settings_is_refused(root):
    fill_cache(stage_cfg("cache_latents", root, overrides=["loader.cache_name=shared"]))
    other = stage_cfg("cache_latents", root, overrides=["loader.cache_name=shared", "cache.seed=5"])
    with pytest.raises(ValueError, match="cache_info.json.*seed"):
        _check_or_write_info(latent_cache_dir(other), cache_identity(other))


def test_cache_of_other_random_text_encoders_is_refused(root):
    """Random text encoders are drawn from train.seed: a cache encoded with other ones would hand the UNet contexts
    that its sampling-time encoders never produce."""
    fill_cache(stage_cfg("cache_latents", root, overrides=["loader.cache_name=shared"]))
    other = stage_cfg("cache_latents", root, overrides=["loader.cache_name=shared", "train.seed=7"])
    with pytest.raises(ValueError, match="cache_info.json.*text_encoders"):
        _check_or_write_info(latent_cache_dir(other), cache_identity(other))


def test_cache_of_a_retrained_vae_is_refused_by_training_and_encoded_again_by_the_cache_stage(root):
    """The VAE's weights are part of the cache's identity: after train_vae re-runs, neither the cache stage nor the
    training stage uses latents of the old weights."""
    from stages.train.stage_entry import check_cache
    from stages.train.task_components import build_frozen_vae
    from stages.train.tasks import final_dir

    cfg = stage_cfg("cache_latents", root)
    vae, _ = build_frozen_vae(cfg, torch.device("cpu"))
    vae.save_pretrained(final_dir(cfg, "train_vae"))
    fill_cache(cfg)
    train = stage_cfg("pretrain256", root, overrides=["loader.cached=true"])
    check_cache(train)  # same weights: accepted
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)  # "retrained"
    vae.save_pretrained(final_dir(cfg, "train_vae"))
    with pytest.raises(ValueError, match="vae"):
        check_cache(train)
    with pytest.raises(ValueError, match="cache_info.json.*vae"):
        _check_or_write_info(latent_cache_dir(cfg), cache_identity(cfg))
    # The cache stage itself encodes it again (a chain re-run after train_vae), and training then accepts it.
    stale = os.path.join(latent_cache_dir(cfg), "stale-marker")
    open(stale, "w").close()
    _check_or_write_info(latent_cache_dir(cfg), cache_identity(cfg), replace_stale_models=True)
    assert not os.path.exists(stale)
    fill_cache(cfg)
    check_cache(train)
    other = stage_cfg("cache_latents", root, overrides=["cache.seed=5"])  # other settings: still refused
    with pytest.raises(ValueError, match="cache_info.json.*seed"):
        _check_or_write_info(latent_cache_dir(other), cache_identity(other), replace_stale_models=True)


def test_cached_loader_without_cache_names_the_folder(root):
    cfg = stage_cfg("pretrain256", root, overrides=["loader.cached=true"])
    with pytest.raises(FileNotFoundError, match="latents"):
        build_plan(cfg, 0, 1, 1)


def test_cached_buckets_too_small_for_the_global_batch(root):
    fill_cache(stage_cfg("cache_latents", root, overrides=ASPECT))
    train = stage_cfg("finetune_aspect", root, overrides=ASPECT + ["loader.cached=true", "train.init_from=null"])
    with pytest.raises(ValueError, match="cache.min_bucket_samples=8"):
        build_plan(train, 0, 2, 4)


@pytest.mark.slow
@pytest.mark.integration
def test_stage_runs_on_ray_data(root, ray_local, make_ctx):
    cfg = stage_cfg("cache_latents", root)
    summary = run(cfg, make_ctx("cache_latents", root=root))
    assert summary["samples"] == sum(BUCKETS.values()) and summary["encoded_files"] == summary["files"]
    again = run(cfg, make_ctx("cache_latents", root=root))
    assert again["encoded_files"] == 0


def test_a_moved_root_keeps_its_cache_and_other_weights_are_still_refused(tmp_path):
    """A trained VAE is known by its weights' hash: copying the whole root elsewhere (a scratch copy for an
    experiment, a new bucket) keeps the cache valid for training and for the cache stage; changed weights do not."""
    import shutil

    from stages.train.stage_entry import check_cache
    from stages.train.task_components import build_frozen_vae
    from stages.train.tasks import final_dir

    first = tmp_path / "first"
    write_dataset(str(first / "data" / "default"), BUCKETS)
    cfg = stage_cfg("cache_latents", str(first))
    vae, _ = build_frozen_vae(cfg, torch.device("cpu"))
    vae.save_pretrained(final_dir(cfg, "train_vae"))
    fill_cache(cfg)
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    moved_cfg = stage_cfg("cache_latents", str(moved))
    check_cache(stage_cfg("pretrain256", str(moved), overrides=["loader.cached=true"]))
    _check_or_write_info(latent_cache_dir(moved_cfg), cache_identity(moved_cfg))  # not re-encoded, not refused
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(final_dir(moved_cfg, "train_vae"))
    with pytest.raises(ValueError, match="vae"):
        check_cache(stage_cfg("pretrain256", str(moved), overrides=["loader.cached=true"]))
    from stages.train.cache_latents import same_vae

    assert same_vae("trained:/a/ema@sha256:00ff", "trained:/b/ema@sha256:00ff")
    assert not same_vae("trained:/a/ema@sha256:00ff", "trained:/a/ema@sha256:11ee")
    assert not same_vae("preset:tiny", "trained:/a/ema@sha256:00ff")
