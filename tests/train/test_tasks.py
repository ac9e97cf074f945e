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
from stages.train.task_vae import VAETask
from tests.train.shard_fixtures import stage_cfg, write_dataset

BUCKETS = {(64, 64): 6, (48, 80): 4, (80, 48): 4}
SAMPLE = ["train.sample.prompts=[a red circle]", "train.sample.steps=2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("root")
    write_dataset(str(path / "data" / "default"), BUCKETS)
    return str(path)


def first_batch(cfg, micro=2):
    return next(make_batch_iterator(cfg, 0, 1, micro, 0, 1))


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


def test_vae_loss_kl_and_adversarial_term(root):
    cfg = stage_cfg("train_vae", root, overrides=["train.vae.gan_start_step=1", "train.vae.disc_channels=8"])
    task = make_task(cfg)
    assert isinstance(task, VAETask) and task.model_name == "vae"
    model = task.build_model()
    task.setup(torch.device("cpu"))
    batch = first_batch(cfg)
    loss, metrics = task.loss(model, {**batch, "step": 0}, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and "g_loss" not in metrics and metrics["kl"] >= 0
    loss.backward()
    assert all(p.grad is not None for p in model.vae.encoder.parameters() if p.requires_grad)
    before = [p.detach().clone() for p in task.discriminator.parameters()]
    model.zero_grad()
    loss, metrics = task.loss(model, {**batch, "step": 1}, torch.Generator().manual_seed(0))
    assert "g_loss" in metrics and "d_loss" in metrics
    loss.backward()
    # the generator term did not leave gradients on the discriminator; its own step moved it
    assert all(p.grad is None for p in task.discriminator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, task.discriminator.parameters()))
    images = task.sample_images(model, step=1)
    assert len(images) == 4 and images[0].size == (128, 64)


def test_edge_loss_prefers_a_sharp_edge_to_the_ramp_a_squared_error_settles_on():
    from stages.train.task_vae import edge_loss

    x = torch.linspace(-1, 1, 16)
    step = torch.where(x < 0, -1.0, 1.0).expand(1, 3, 16, 16)
    # Where the edge sits is uncertain between two columns (0.6 / 0.4): the squared error is lowest for the
    # average of the two placements (a soft ramp), the gradient term for one sharp edge at the likelier place.
    left, right = step.roll(-1, dims=3), step.roll(1, dims=3)
    ramp = 0.6 * left + 0.4 * right
    mse = lambda a: 0.6 * (a - left).pow(2).mean() + 0.4 * (a - right).pow(2).mean()  # noqa: E731
    edge = lambda a: 0.6 * edge_loss(a, left) + 0.4 * edge_loss(a, right)  # noqa: E731
    assert mse(ramp) < mse(left) and edge(left) < edge(ramp)
    assert edge_loss(step, step) == 0 and edge_loss(step + 0.3, step) < 1e-6  # a flat offset is not an edge error


def test_vae_edge_term_enters_the_loss_when_weighted(root):
    cfg = stage_cfg("train_vae", root, overrides=["train.vae.gan_weight=0", "train.vae.edge_weight=2.0"])
    task = make_task(cfg)
    model = task.build_model()
    task.setup(torch.device("cpu"))
    loss, metrics = task.loss(model, first_batch(cfg), torch.Generator().manual_seed(0))
    assert metrics["edge_loss"] > 0
    assert loss.item() == pytest.approx(metrics["rec_loss"] + 1e-6 * metrics["kl"] + 2.0 * metrics["edge_loss"], rel=1e-5)
    off = make_task(stage_cfg("train_vae", root, overrides=["train.vae.gan_weight=0"]))
    off.setup(torch.device("cpu"))
    assert "edge_loss" not in off.loss(model, first_batch(cfg), torch.Generator().manual_seed(0))[1]


def test_a_wider_autoencoder_trains_and_the_diffusion_stages_load_it_from_its_saved_config(root, tmp_path):
    from stages.train.task_components import build_frozen_vae

    wide = ["train.vae.block_out_channels=[32,64,64]", "train.vae.layers_per_block=2"]
    task = make_task(stage_cfg("train_vae", root, overrides=wide))
    model = task.build_model()
    assert list(model.vae.config.block_out_channels) == [32, 64, 64] and model.vae.config.layers_per_block == 2
    out = str(tmp_path / "wide")
    task.save_pretrained(model, out)
    # the frozen VAE of a diffusion stage (and train.init_from without widths) take the saved architecture
    frozen, _ = build_frozen_vae(stage_cfg("pretrain256", root, overrides=[f"train.vae_from={out}"]),
                                 torch.device("cpu"))
    child = VAETask(stage_cfg("train_vae", root, overrides=[f"train.init_from={out}"])).build_model()
    for loaded in (frozen, child.vae):
        assert list(loaded.config.block_out_channels) == [32, 64, 64]
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.vae.state_dict().values()))
    # widths that do not fit the checkpoint it continues are refused naming the file
    with pytest.raises(ValueError, match="wide"):
        VAETask(stage_cfg("train_vae", root, overrides=[f"train.init_from={out}",
                                                        "train.vae.block_out_channels=[16,32,32]"])).build_model()
    with pytest.raises(ValueError, match="3 levels"):
        make_task(stage_cfg("train_vae", root, overrides=["train.vae.block_out_channels=[16,32]"]))


def test_vae_checkpoint_round_trip_and_lpips_weights_error(root, tmp_path):
    cfg = stage_cfg("train_vae", root)
    task = make_task(cfg)
    model = task.build_model()
    out = str(tmp_path / "vae")
    task.save_pretrained(model, out)
    assert os.path.isfile(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    # the saved config carries the latent scale measured on the dataset (1 / std of the posterior means)
    import json

    from sdxl.latent_scale import measure_scaling_factor
    saved = json.load(open(os.path.join(out, "config.json")))["scaling_factor"]
    expected = measure_scaling_factor(model.vae.eval(), task._fixed_inputs(256))
    assert saved == pytest.approx(expected, rel=1e-6) and saved != pytest.approx(0.13025, rel=0.01)
    # ...and the diffusion stages' frozen VAE, built from the saved config with these weights, uses that scale
    from sdxl.latent_scale import vae_scaling_factor
    from stages.train.task_components import build_frozen_vae
    frozen, source = build_frozen_vae(stage_cfg("pretrain256", root, overrides=[f"train.vae_from={out}"]),
                                      torch.device("cpu"))
    assert source.startswith("trained:") and vae_scaling_factor(frozen) == pytest.approx(saved, rel=1e-6)
    child = VAETask(stage_cfg("train_vae", root, overrides=[f"train.init_from={out}"])).build_model()
    assert all(torch.equal(a, b) for a, b in zip(child.state_dict().values(), model.state_dict().values()))
    bad = str(tmp_path / "lpips.safetensors")
    from safetensors.torch import save_file
    save_file({"lins.0.weight": torch.zeros(1, 64, 1, 1)}, bad)
    task = make_task(stage_cfg("train_vae", root, overrides=[f"train.vae.lpips_weights={bad}"]))
    with pytest.raises(ValueError, match="lpips.safetensors"):
        task.setup(torch.device("cpu"))


def test_unknown_task_kind(root):
    with pytest.raises(ValueError, match="train.task"):
        make_task(stage_cfg("pretrain256", root, overrides=["train.task=decoder"]))


def test_perceptual_loss_loads_a_full_weights_file(tmp_path):
    from safetensors.torch import save_file

    from stages.train.perceptual import PerceptualLoss

    net = PerceptualLoss()
    for lin in net.lins:
        torch.nn.init.uniform_(lin.weight, 0.0, 1.0)
    path = str(tmp_path / "lpips_vgg.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    from sdxl.checkpoint import load_into

    loaded = load_into(PerceptualLoss(), path).eval()
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded(a, a), torch.zeros(2), atol=1e-6)
    assert (loaded(a, b) > 0).all()


# ---- the perceptual term: lpips_weights=auto (torch hub VGG16 + torchmetrics' LPIPS heads) ------------------------
@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """A private torch hub cache (tests never reach the network)."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_lpips_auto_uses_the_hub_vgg16_and_torchmetrics_heads(root, hub_dir):
    from torchvision.models.vgg import cfgs, make_layers

    from stages.train.perceptual import lpips_auto_sources

    torch.manual_seed(0)
    trunk = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}  # torchvision vgg16 keys
    trunk["classifier.0.weight"] = torch.zeros(2, 2)  # the real file has the classifier too: ignored
    torch.save(trunk, hub_dir / "checkpoints" / "vgg16-397923af.pth")
    task = make_task(stage_cfg("train_vae", root, overrides=["train.vae.lpips_weights=auto"]))
    task.setup(torch.device("cpu"))
    assert task.perceptual is not None
    loaded = task.perceptual.state_dict()
    assert torch.equal(loaded["features.28.weight"], trunk["features.28.weight"])
    heads = torch.load(lpips_auto_sources()[1], map_location="cpu", weights_only=True)
    assert torch.equal(loaded["lins.4.weight"], heads["lin4.model.1.weight"])
    model = task.build_model()
    _, metrics = task.loss(model, first_batch(stage_cfg("train_vae", root)), torch.Generator().manual_seed(0))
    assert metrics["lpips"] > 0
    assert task.lineage_tags()["lpips"].startswith("auto")


def test_lpips_auto_without_the_vgg16_weights_says_what_is_missing(root, hub_dir, caplog):
    task = make_task(stage_cfg("train_vae", root, overrides=["train.vae.lpips_weights=auto"]))
    with caplog.at_level("WARNING"):
        task.setup(torch.device("cpu"))
    assert task.perceptual is None
    expected = str(hub_dir / "checkpoints" / "vgg16-397923af.pth")
    messages = [r.getMessage() for r in caplog.records if "LPIPS" in r.getMessage()]
    assert len(messages) == 1 and expected in messages[0] and "lpips_weights" in messages[0]
    assert "off" in task.lineage_tags()["lpips"] and expected in task.lineage_tags()["lpips"]


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
