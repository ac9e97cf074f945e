import os
import shutil
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.data.records import MANIFEST_SCHEMA
from stages.train.stage_entry import run, validate_inputs
from tests.train.shard_fixtures import stage_cfg, write_dataset

TRAINING_STAGES = ["pretrain256", "pretrain512", "finetune_aspect", "finetune_quality", "train_refiner", "train_vae"]


@pytest.fixture
def root(tmp_path):
    write_dataset(str(tmp_path / "data" / "default"), {(64, 64): 4, (48, 80): 4})
    return str(tmp_path)


def dataset(root):
    return os.path.join(root, "data", "default")


def test_valid_inputs_then_the_trainer_runs(root, monkeypatch, make_ctx):
    calls = []
    trainer = types.ModuleType("stages.train.trainer")
    trainer.run_training = lambda cfg, ctx: calls.append(ctx.stage) or {"steps": 3}
    monkeypatch.setitem(sys.modules, "stages.train.trainer", trainer)
    result = run(stage_cfg("pretrain256", root), make_ctx("pretrain256", root=root))
    assert calls == ["pretrain256"]
    assert result["steps"] == 3 and result["samples"] == 8 and result["parent_checkpoint"] == "scratch"


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest.parquet"):
        validate_inputs(stage_cfg("pretrain256", str(tmp_path)))


def test_empty_manifest(root):
    pq.write_table(MANIFEST_SCHEMA.empty_table(), os.path.join(dataset(root), "manifest.parquet"))
    with pytest.raises(ValueError, match=r"manifest.parquet has no samples"):
        validate_inputs(stage_cfg("pretrain256", root))


def test_manifest_without_required_columns(root):
    pq.write_table(pa.table({"key": ["a"]}), os.path.join(dataset(root), "manifest.parquet"))
    with pytest.raises(ValueError, match=r"manifest.parquet lacks required column"):
        validate_inputs(stage_cfg("pretrain256", root))


def test_empty_shard_folder(root):
    shutil.rmtree(os.path.join(dataset(root), "shards"))
    os.makedirs(os.path.join(dataset(root), "shards"))
    with pytest.raises(FileNotFoundError, match=r"no shard files .* under .*shards"):
        validate_inputs(stage_cfg("pretrain256", root))


def test_missing_shard_file(root):
    os.remove(os.path.join(dataset(root), "shards", "48x80", "48x80-00000.tar"))
    with pytest.raises(FileNotFoundError, match=r"48x80-00000.tar"):
        validate_inputs(stage_cfg("pretrain256", root))


def test_manifest_for_another_resolution(root):
    cfg = stage_cfg("finetune_aspect", root, preset="full",
                    overrides=["train.init_from=null", "loader.require_table_match=true"])
    with pytest.raises(ValueError, match=r"manifest.parquet has buckets .* loader.resolution=1024"):
        validate_inputs(cfg)


def test_missing_parent_checkpoint(root):
    with pytest.raises(FileNotFoundError, match=r"runs.pretrain256.final.ema"):
        validate_inputs(stage_cfg("pretrain512", root))


def test_cached_mode_without_cache(root):
    with pytest.raises(FileNotFoundError, match=r"latents.tiny-64-square"):
        validate_inputs(stage_cfg("pretrain256", root, overrides=["loader.cached=true"]))


def test_filter_that_keeps_nothing(root):
    with pytest.raises(ValueError, match=r"loader.filter .* keeps no sample"):
        validate_inputs(stage_cfg("train_refiner", root, overrides=["loader.filter='aesthetic_score > 100'"]))


def test_refiner_weighting_on_an_unscored_manifest_is_refused_before_training(tmp_path):
    write_dataset(str(tmp_path / "data" / "default"), {(64, 64): 4}, scores=False)
    with pytest.raises(ValueError, match=r"loader.weight_by column 'aesthetic_score' has no values"):
        validate_inputs(stage_cfg("train_refiner", str(tmp_path)))
    assert validate_inputs(stage_cfg("train_refiner", str(tmp_path), overrides=["loader.weight_by=null"]))["samples"] == 4


@pytest.mark.parametrize("preset,expected", [
    ("tiny", {"pretrain256": 64, "pretrain512": 96, "finetune_aspect": 128, "finetune_quality": 128,
              "train_refiner": 128, "train_vae": 64, "cache_latents": 64}),
    ("full", {"pretrain256": 256, "pretrain512": 512, "finetune_aspect": 1024, "finetune_quality": 1024,
              "train_refiner": 1024, "train_vae": 256, "cache_latents": 256}),
])
def test_stage_configs_compose_at_both_presets(tmp_path, preset, expected):
    for stage, resolution in expected.items():
        cfg = stage_cfg(stage, str(tmp_path), preset=preset)
        assert cfg.loader.resolution == resolution, stage
    parents = {s: stage_cfg(s, str(tmp_path), preset=preset).train.get("parent_stage") for s in TRAINING_STAGES}
    assert parents == {"pretrain256": None, "pretrain512": "pretrain256", "finetune_aspect": "pretrain512",
                       "finetune_quality": "finetune_aspect", "train_refiner": None, "train_vae": None}
    aspect = stage_cfg("finetune_aspect", str(tmp_path), preset=preset)
    assert aspect.loader.multi_aspect and aspect.train.offset_noise == 0.05
    assert aspect.loader.bucket_multiple == (64 if preset == "full" else 8)
    refiner = stage_cfg("train_refiner", str(tmp_path), preset=preset)
    assert refiner.train.task == "refiner" and list(refiner.train.t_range) == [0, 200]
    quality = stage_cfg("finetune_quality", str(tmp_path), preset=preset)
    assert list(quality.loader.top_k_by.columns) == ["aesthetic_score", "clip_score"] and quality.train.lr == 1e-5
    vae = stage_cfg("train_vae", str(tmp_path), preset=preset)
    assert vae.train.vae.gan_start_step == (50000 if preset == "full" else 50)


# Each training stage's own length at preset=full (paper: 600k at 256², 200k at 512²; the rest docs/decisions.md),
# and the warm-up its cosine schedule starts with.
FULL_LENGTHS = {"pretrain256": (600_000, 10_000), "pretrain512": (200_000, 10_000),
                "finetune_aspect": (50_000, 5_000), "finetune_quality": (20_000, 1_000),
                "train_refiner": (100_000, 10_000), "train_vae": (300_000, 5_000)}


def _compose_full(stage: str, root: str):
    from hydra import compose, initialize_config_dir

    conf = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base=None):
        return compose(config_name="config", overrides=[f"stage={stage}", "preset=full", f"paths.root={root}"])


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_every_training_stage_has_its_own_length_and_schedule_at_full(stage, tmp_path):
    import torch

    from stages.train.schedules import make_lr_scheduler

    cfg = _compose_full(stage, str(tmp_path))
    max_steps, warmup = FULL_LENGTHS[stage]
    assert (cfg.train.max_steps, cfg.train.warmup_steps) == (max_steps, warmup)
    assert cfg.train.max_steps == cfg.stage_sizes.full.max_steps  # set in the stage's own file
    # the cosine runs from the end of the warm-up to this stage's max_steps
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(cfg.train.lr))
    multiplier = make_lr_scheduler(optimizer, cfg.train).lr_lambdas[0]
    floor = float(cfg.train.min_lr) / float(cfg.train.lr)
    assert multiplier(warmup) == pytest.approx(1.0)
    assert multiplier(warmup + (max_steps - warmup) // 2) == pytest.approx((1 + floor) / 2, abs=1e-4)
    assert multiplier(max_steps - 1) == pytest.approx(floor, abs=1e-6) and multiplier(max_steps) == floor
    assert multiplier(max_steps // 2) > floor + 0.1 * (1 - floor)  # not already decayed halfway through the stage


def test_autoencoder_recipe_at_full(tmp_path):
    vae = _compose_full("train_vae", str(tmp_path))
    assert vae.train.global_batch_size == 256  # Sec. 2.4: the autoencoder at batch 256
    assert vae.train.vae.lpips_weights == "auto"  # the perceptual term wherever its weights are on disk
    assert _compose_full("pretrain256", str(tmp_path)).train.global_batch_size == 2048
