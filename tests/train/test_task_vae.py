"""The autoencoder task (train.task=vae): its loss terms (KL, adversarial, edge, LPIPS), widths beyond the preset,
and the round trip of what it saves into the diffusion stages' frozen VAE and train.init_from."""

import os

import pytest
import torch

from stages.train.task_vae import VAETask
from stages.train.tasks import make_task
from tests.train.shard_fixtures import TASK_BUCKETS, first_batch, stage_cfg, write_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("root")
    write_dataset(str(path / "data" / "default"), TASK_BUCKETS)
    return str(path)


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


def test_random_crops_are_windows_of_each_image_at_its_scale_with_corners_on_the_latent_grid():
    from stages.train.task_vae import random_crops

    pixels = torch.arange(8 * 3 * 64 * 48, dtype=torch.float32).reshape(8, 3, 64, 48)
    crops = random_crops(pixels, 32, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (8, 3, 32, 32)
    corners = set()
    for image, crop in zip(pixels, crops):
        # the window's first pixel names its corner in the source image
        top, left = divmod(int(crop[0, 0, 0].item() - image[0, 0, 0].item()), 48)
        assert top % 4 == 0 and left % 4 == 0 and top <= 32 and left <= 16
        assert torch.equal(crop, image[:, top:top + 32, left:left + 32])
        corners.add((top, left))
    assert len(corners) > 1  # each image gets its own place
    again = random_crops(pixels, 32, 4, torch.Generator().manual_seed(0))
    assert torch.equal(again, crops)
    with pytest.raises(ValueError, match="multiple of 4"):
        random_crops(pixels, 30, 4, torch.Generator())
    with pytest.raises(ValueError, match="at most"):
        random_crops(pixels, 56, 4, torch.Generator())


def test_vae_trains_on_crops_when_crop_size_is_set(root):
    cfg = stage_cfg("train_vae", root, overrides=["train.vae.gan_weight=0", "train.vae.crop_size=16"])
    task = make_task(cfg)
    model = task.build_model()
    task.setup(torch.device("cpu"))
    batch = first_batch(cfg)
    assert batch["pixels"].shape[-1] > 16
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    loss, metrics = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert seen[0][-2:] == (16, 16) and torch.isfinite(loss) and metrics["psnr"] > 0
    loss.backward()
    for bad in (18, 0, 4096):  # off the latent grid, empty, larger than the images: refused before any work
        with pytest.raises(ValueError, match="crop_size"):
            make_task(stage_cfg("train_vae", root, overrides=[f"train.vae.crop_size={bad}"]))


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
