"""The diffusion tasks (base, refiner, finetunes): timestep ranges, offset noise, SNR weighting, init_from, samples,
the unconditional input each kind trains with, and c_size. The autoencoder task is in test_task_vae.py."""

import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import sdxl.diffusion
from sdxl.models import build_unet
from stages.train.cache_latents import CacheActor, _check_or_write_info, cache_identity, plan_cache
from stages.train.data_loader import make_batch_iterator
from stages.train.data_manifest import latent_cache_dir
from stages.train.tasks import final_dir, make_task
from stages.train.task_diffusion import DiffusionTask
from tests.train.shard_fixtures import TASK_BUCKETS, first_batch, stage_cfg, write_dataset

SAMPLE = ["train.sample.prompts=[a red circle]", "train.sample.steps=2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("root")
    write_dataset(str(path / "data" / "default"), TASK_BUCKETS)
    return str(path)


class TimestepRecorder(nn.Module):
    """Passes calls through to a UNet and keeps the timesteps it was asked about."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.seen = unet, []

    def forward(self, sample, timestep, **kwargs):
        self.seen.append(timestep.detach().clone())
        return self.unet(sample, timestep, **kwargs)


def test_base_loss_is_finite_and_backward_reaches_the_unet(root):
    cfg = stage_cfg("pretrain256", root, overrides=SAMPLE)
    task = make_task(cfg)
    assert isinstance(task, DiffusionTask) and task.model_name == "base"
    model = task.build_model()
    task.setup(torch.device("cpu"))
    loss, metrics = task.loss(model, first_batch(cfg), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and np.isfinite(metrics["loss"])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    # frozen parts stay frozen
    assert not any(p.requires_grad for p in task.frozen.vae.parameters())
    assert not any(p.requires_grad for p in task.frozen.conditioner.parameters())
    units = task.wrap_units(model)
    assert {type(u).__name__ for u in units} == {"ResnetBlock2D", "Transformer2DModel"}
    tags = task.lineage_tags()
    assert tags["parent_checkpoint"] == "scratch" and len(tags["manifest_sha256"]) == 64


def test_refiner_trains_on_the_first_200_timesteps_with_aesthetic_conditioning(root):
    cfg = stage_cfg("train_refiner", root, overrides=["loader.filter=null"])
    task = make_task(cfg)
    assert task.model_name == "refiner" and task.t_range == (0, 200)
    model = TimestepRecorder(task.build_model())
    task.setup(torch.device("cpu"))
    batch = first_batch(cfg, micro=4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        loss, _ = task.loss(model, batch, gen)
        assert torch.isfinite(loss)
    seen = torch.cat(model.seen)
    assert int(seen.min()) >= 0 and int(seen.max()) < 200
    cond = task._conditioning(batch, gen)
    assert cond.time_ids.shape == (4, 5)
    assert torch.allclose(cond.time_ids[:, 4], batch["aesthetic_score"])


def test_finetune_aspect_uses_offset_noise(root, monkeypatch):
    cfg = stage_cfg("finetune_aspect", root, overrides=["train.init_from=null"])
    task = make_task(cfg)
    assert task.offset_noise == 0.05 and cfg.loader.multi_aspect
    calls = []
    real = sdxl.diffusion.make_noise

    def spy(shape, offset_noise=0.0, generator=None, device=None, dtype=torch.float32):
        calls.append(offset_noise)
        return real(shape, offset_noise, generator, device, dtype)

    monkeypatch.setattr(sdxl.diffusion, "make_noise", spy)
    model = task.build_model()
    task.setup(torch.device("cpu"))
    loss, _ = task.loss(model, first_batch(cfg), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and calls == [0.05]
    # the statistics of that noise: per-(sample, channel) means vary by ≈ offset² beyond white noise's 1/(H·W)
    noise = real((512, 4, 32, 32), 0.05, torch.Generator().manual_seed(0))
    excess = noise.mean(dim=(2, 3)).var().item() - 1 / (32 * 32)
    assert 0.0015 < excess < 0.0035


def test_snr_gamma_weights_the_stage_loss_and_is_recorded(root, monkeypatch):
    cfg = stage_cfg("pretrain256", root, overrides=["train.snr_gamma=5.0"])
    task = make_task(cfg)
    seen = []
    real = sdxl.diffusion.min_snr_weights

    def spy(timesteps, gamma, schedule=None):
        seen.append(gamma)
        return real(timesteps, gamma, schedule)

    monkeypatch.setattr(sdxl.diffusion, "min_snr_weights", spy)
    model = task.build_model()
    task.setup(torch.device("cpu"))
    loss, _ = task.loss(model, first_batch(cfg), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and seen == [5.0]
    assert task.lineage_tags()["snr_gamma"] == "5.0"
    assert make_task(stage_cfg("pretrain256", root)).lineage_tags()["snr_gamma"] == "None"
    with pytest.raises(ValueError, match="train.snr_gamma"):
        make_task(stage_cfg("pretrain256", root, overrides=["train.snr_gamma=0"]))


def test_init_from_auto_loads_the_parent_ema(root):
    parent = build_unet("tiny", "base", seed=123)
    ema_dir = final_dir(stage_cfg("pretrain512", root), "pretrain256")
    make_task(stage_cfg("pretrain256", root)).save_pretrained(parent, ema_dir)
    task = make_task(stage_cfg("pretrain512", root))
    assert task.init_path == ema_dir
    child = task.build_model()
    scratch = build_unet("tiny", "base", seed=0)
    for (name, a), b, c in zip(child.state_dict().items(), parent.state_dict().values(), scratch.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(child.state_dict().values(), scratch.state_dict().values()))
    assert task.lineage_tags()["parent_checkpoint"] == ema_dir


def test_missing_parent_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"runs.pretrain512.final.ema.*stage=pretrain512"):
        make_task(stage_cfg("finetune_aspect", str(tmp_path)))


def test_checkpoint_of_another_model_names_the_file(root, tmp_path):
    wrong = str(tmp_path / "refiner_ckpt")
    build_unet("tiny", "refiner").save_pretrained(wrong)
    task = make_task(stage_cfg("pretrain512", root, overrides=[f"train.init_from={wrong}"]))
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        task.build_model()


def test_base_samples_are_images_of_the_stage_size(root):
    cfg = stage_cfg("pretrain256", root, overrides=SAMPLE)
    task = make_task(cfg)
    model = task.build_model()
    task.setup(torch.device("cpu"))
    images = task.sample_images(model, step=0)
    assert len(images) == 1 and images[0].size == (64, 64)
    assert model.training


def test_refiner_samples_refine_a_base_sample(root):
    cfg = stage_cfg("train_refiner", root, overrides=SAMPLE + ["loader.filter=null", "train.sample.resolution=64"])
    task = make_task(cfg)
    model = task.build_model()
    task.setup(torch.device("cpu"))
    images = task.sample_images(model, step=0)
    assert len(images) == 1 and images[0].size == (64, 64)


def test_unknown_task_kind(root):
    with pytest.raises(ValueError, match="train.task"):
        make_task(stage_cfg("pretrain256", root, overrides=["train.task=decoder"]))


# ---- the unconditional input (SPEC, "Classifier-free guidance"): zeros for the base, "" for the refiner --------
ALWAYS_DROP = ["train.ucg_rate=1.0", "loader.filter=null"]


@pytest.fixture(scope="module")
def cached_root(root):
    """The latent cache of pretrain256's loader settings (what cache_latents writes, in-process)."""
    cfg = stage_cfg("cache_latents", root)
    _check_or_write_info(latent_cache_dir(cfg), cache_identity(cfg))
    actor = CacheActor(OmegaConf.to_container(cfg, resolve=True), "cpu")
    for item in plan_cache(cfg):
        actor.process(item)
    assert os.path.isfile(os.path.join(latent_cache_dir(cfg), "_uncond.safetensors"))
    return root


def _dropped(stage: str, root: str, extra: list[str]):
    cfg = stage_cfg(stage, root, overrides=ALWAYS_DROP + extra)
    task = make_task(cfg)
    task.setup(torch.device("cpu"))
    batch = next(make_batch_iterator(cfg, 0, 1, 2, 0, 1))
    return task, task._conditioning(batch, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cached", [False, True])
def test_base_training_drops_text_to_zeros(cached, cached_root):
    task, cond = _dropped("pretrain256", cached_root, [f"loader.cached={str(cached).lower()}"])
    assert cond.context.shape == (2, 77, 96)
    assert torch.count_nonzero(cond.context) == 0 and torch.count_nonzero(cond.pooled) == 0
    assert torch.count_nonzero(cond.time_ids) > 0  # micro-conditioning is kept
    assert task.lineage_tags()["unconditional"] == "zeros"


@pytest.mark.parametrize("cached", [False, True])
def test_refiner_training_drops_text_to_the_empty_prompt(cached, cached_root):
    task, cond = _dropped("train_refiner", cached_root,
                          [f"loader.cached={str(cached).lower()}", "loader.multi_aspect=false", "loader.resolution=64"])
    empty_context, empty_pooled = task.frozen.conditioner.encode([""])
    assert torch.count_nonzero(empty_context) > 0
    # the cache stores float16 by default
    assert torch.allclose(cond.context, empty_context.expand(2, -1, -1), atol=2e-3)
    assert torch.allclose(cond.pooled, empty_pooled.expand(2, -1), atol=2e-3)
    assert task.lineage_tags()["unconditional"] == "empty_prompt"


def test_sample_grid_guides_with_the_trained_unconditional_input(root, monkeypatch):
    import stages.train.task_diffusion as task_diffusion

    seen = []
    real = task_diffusion.sample_base

    def spy(unet, cond, uncond, params, latents=None):
        seen.append(uncond)
        return real(unet, cond, uncond, params, latents)

    monkeypatch.setattr(task_diffusion, "sample_base", spy)
    cfg = stage_cfg("pretrain256", root, overrides=["train.sample.prompts=[a red circle]", "train.sample.steps=1"])
    task = make_task(cfg)
    model = task.build_model()
    task.setup(torch.device("cpu"))
    task.sample_images(model, step=0)
    assert len(seen) == 1 and torch.count_nonzero(seen[0].context) == 0 and torch.count_nonzero(seen[0].pooled) == 0


@pytest.mark.parametrize("cached", [False, True])
def test_size_conditioning_off_gives_the_crop_size_as_c_size(cached, cached_root):
    """The paper's no-size-conditioning ablation: c_size carries the crop's own size, whatever the original was."""
    extra = [f"loader.cached={str(cached).lower()}"]
    cfg_on = stage_cfg("pretrain256", cached_root, overrides=extra)
    cfg_off = stage_cfg("pretrain256", cached_root, overrides=[*extra, "train.size_conditioning=false"])
    batch = next(make_batch_iterator(cfg_on, 0, 1, 4, 0, 1))
    assert not torch.equal(torch.as_tensor(batch["original_size"]), torch.as_tensor(batch["target_size"]))
    ids = {}
    for name, cfg in (("on", cfg_on), ("off", cfg_off)):
        task = make_task(cfg)
        task.setup(torch.device("cpu"))
        ids[name] = task._conditioning(batch, torch.Generator().manual_seed(0)).time_ids
    target = torch.as_tensor(batch["target_size"]).float()
    assert torch.equal(ids["on"][:, :2], torch.as_tensor(batch["original_size"]).float())
    assert torch.equal(ids["off"][:, :2], target)
    assert torch.equal(ids["off"][:, 2:], ids["on"][:, 2:])  # crop and target size are kept
