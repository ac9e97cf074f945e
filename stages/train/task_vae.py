"""Training task of the autoencoder (SDXL Sec. 2.4; the LDM autoencoder objective).

loss = reconstruction (L1 or L2, mean per pixel element) + ``lpips_weight`` · LPIPS (with ``train.vae.lpips_weights``:
a file, or ``auto`` where the weights are on disk; stages/train/perceptual.py) + ``kl_weight`` · KL(posterior ‖ N(0, I)) summed over latent elements / pixel elements
(the LDM ratio, so its ``kl_weight`` 1e-6 carries over) + ``edge_weight`` · L1 between the reconstruction's and the
input's finite differences (:func:`edge_loss`) + ``gan_weight`` · hinge generator loss of a patch-GAN discriminator from
step ``gan_start_step`` on.

The discriminator is the task's own module with its own AdamW, stepped inside :meth:`VAETask.loss` on detached
reconstructions (its gradients are averaged over ranks by hand): the trainer's optimizer, EMA and checkpoints
cover the autoencoder only, so a resumed run restarts the discriminator from scratch. The generator term evaluates
the discriminator with detached parameters (``torch.func.functional_call``), so it never pushes the discriminator.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from sdxl.crops import bucket_crop_resize, crop
from sdxl.diffusion import make_noise
from sdxl.latent_scale import measure_scaling_factor
from sdxl.models import build_vae
from sdxl.presets import get_preset
from sdxl.sampling import to_pil
from stages.train.data_loader import decode_rgb, pil_to_tensor
from stages.train.data_manifest import dataset_dir_from_cfg, select_samples
from stages.train.data_shards import TarShardReader, sample_member
from stages.train.perceptual import build_perceptual
from stages.train.task_components import load_trained_vae
from stages.train.tasks import (TrainTask, data_lineage, load_module_weights, resolve_init_from,
                                save_module_pretrained, task_option)

VAE_DEFAULTS = {"recon_loss": "l1", "kl_weight": 1e-6, "edge_weight": 0.0, "lpips_weights": None, "lpips_weight": 1.0,
                "gan_weight": 0.5, "gan_start_step": 50, "disc_channels": 64, "disc_layers": 3, "disc_lr": 1e-4,
                "num_samples": 4, "scale_samples": 256, "logvar_init": None, "block_out_channels": None,
                "layers_per_block": None, "crop_size": None}


class AutoencoderForTraining(nn.Module):
    """The trained module: the AutoencoderKL plus a forward that returns what the loss needs in one call (so
    DDP / FSDP see a single forward through the wrapper)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor | None = None):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean if noise is None else posterior.mean + posterior.std * noise
        recon = self.vae.decode(latents).sample
        return recon, posterior.mean, posterior.logvar


class PatchDiscriminator(nn.Module):
    """pix2pix / LDM N-layer patch discriminator (GroupNorm instead of BatchNorm: micro-batches are small)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                     nn.LeakyReLU(0.2)]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_posterior_logvar(vae: AutoencoderKL, value: float) -> None:
    """Start the posterior's log-variance at ``value`` (the bias of quant_conv's logvar half). A fresh VAE starts at
    logvar ≈ 0, i.e. unit posterior noise as large as the latents themselves, which the reconstruction term must
    first learn to shrink before reconstructions improve (docs/decisions.md, "The tiny recipe"); trained LDM/SDXL
    autoencoders end far below 0 anyway, since the KL weight is 1e-6."""
    conv = vae.quant_conv
    if conv is None:
        raise ValueError("train.vae.logvar_init needs a VAE with a quant_conv (use_quant_conv=true)")
    with torch.no_grad():
        conv.bias[conv.out_channels // 2:] = value


def vae_settings(cfg) -> dict:
    section = task_option(cfg, "vae") or {}
    return {k: section.get(k, default) for k, default in VAE_DEFAULTS.items()}


def edge_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical pixel differences of ``recon`` and ``target``.

    Why: a squared pixel error is minimised by the average of the edges the latents leave uncertain, i.e. a ramp, so
    an MSE autoencoder returns every edge equally soft and the latents lose how sharp an image was (the size
    signal SDXL's c_size carries). An L1 term on the gradients prefers one sharp edge at the likelier place (the median), needs no
    pretrained weights (unlike LPIPS) and no discriminator schedule."""
    dx = (recon[..., :, 1:] - recon[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (recon[..., 1:, :] - recon[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def random_crops(pixels: torch.Tensor, size: int, multiple: int, generator: torch.Generator) -> torch.Tensor:
    """One ``size``×``size`` window per image at a random place, its corner on the latent grid (``multiple`` pixels),
    so the crops keep the images' scale and their pixels' phase against the latents.

    Why: the autoencoder is convolutional, so windows of the images at their own scale train the same filters as
    whole images, at a quarter of the cost per step for half-side windows (though it learns no faster per pixel seen);
    downscaling the images instead changes the objects' scale in pixels and the latent space the base then has to
    learn (docs/decisions.md, 2026-12-05 13:55 and 18:15 UTC)."""
    height, width = pixels.shape[-2:]
    if size <= 0 or size % multiple or size > min(height, width):
        raise ValueError(f"train.vae.crop_size={size} must be a multiple of {multiple} and at most the images' "
                         f"{height}x{width}")
    tops = torch.randint(0, (height - size) // multiple + 1, (pixels.shape[0],), generator=generator,
                         device=generator.device) * multiple
    lefts = torch.randint(0, (width - size) // multiple + 1, (pixels.shape[0],), generator=generator,
                          device=generator.device) * multiple
    return torch.stack([crop(image, top, left, size, size)
                        for image, top, left in zip(pixels, tops.tolist(), lefts.tolist())])


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) summed over each sample's latent elements: [B]."""
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


class VAETask(TrainTask):
    model_name = "vae"

    def __init__(self, cfg):
        self.cfg = cfg
        self.preset = get_preset(str(cfg.model.preset))
        self.settings = vae_settings(cfg)
        if self.settings["recon_loss"] not in ("l1", "l2"):
            raise ValueError(f"train.vae.recon_loss must be 'l1' or 'l2', got {self.settings['recon_loss']!r}")
        # Widths / depth of train.vae (null: the preset's), checked here so a bad value fails before any work.
        self.vae_config = self.preset.vae_config(self.settings["block_out_channels"], self.settings["layers_per_block"])
        if bool(cfg.loader.get("cached", False)):
            raise ValueError("train.task=vae trains on pixels: set loader.cached=false")
        crop_size, down = self.settings["crop_size"], self.preset.vae_downsample
        self.crop_size = None if crop_size is None else int(crop_size)
        if self.crop_size is not None and (self.crop_size <= 0 or self.crop_size % down
                                           or self.crop_size > int(cfg.loader.resolution)):
            raise ValueError(f"train.vae.crop_size={crop_size} must be a positive multiple of {down} (the latent grid) "
                             f"and at most loader.resolution={cfg.loader.resolution}")
        self.init_path = resolve_init_from(cfg)
        self.device = torch.device("cpu")
        self.discriminator = None
        self.disc_optimizer = None
        self.perceptual = None
        self.perceptual_source = None  # what the perceptual term was built from (after setup)

    def build_model(self) -> nn.Module:
        widths_given = self.settings["block_out_channels"] is not None or self.settings["layers_per_block"] is not None
        if self.init_path is not None and not widths_given:  # continue the saved autoencoder, whatever its widths
            vae = load_trained_vae(self.init_path, self.preset)
        else:
            vae = build_vae(self.preset, seed=int(task_option(self.cfg, "seed")), config=self.vae_config)
        if self.init_path is not None and widths_given:
            load_module_weights(vae, self.init_path)
        elif self.init_path is None and self.settings["logvar_init"] is not None:
            init_posterior_logvar(vae, float(self.settings["logvar_init"]))
        return AutoencoderForTraining(vae).train().requires_grad_(True)

    def setup(self, device: torch.device) -> None:
        self.device = torch.device(device)
        s = self.settings
        if float(s["gan_weight"]) > 0:
            with torch.random.fork_rng(devices=[]):  # same initial discriminator on every rank
                torch.manual_seed(int(task_option(self.cfg, "seed")) + 17)
                self.discriminator = PatchDiscriminator(int(s["disc_channels"]), int(s["disc_layers"]))
            self.discriminator.to(self.device).train()
            self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=float(s["disc_lr"]),
                                                    betas=(0.5, 0.9))
        perceptual, self.perceptual_source = build_perceptual(s["lpips_weights"])  # warns when auto finds no weights
        if perceptual is not None:
            self.perceptual = perceptual.to(self.device).eval().requires_grad_(False)

    def wrap_units(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, ResnetBlock2D)]

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One hinge-loss update of the discriminator on detached images; gradients averaged over ranks."""
        params = list(self.discriminator.parameters())
        d_loss = F.relu(1.0 - self.discriminator(real)).mean() + F.relu(1.0 + self.discriminator(fake)).mean()
        grads = torch.autograd.grad(d_loss, params)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for p, g in zip(params, grads):
            if world > 1:
                dist.all_reduce(g)
                g = g / world
            p.grad = g
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return float(d_loss.detach())

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        pixels = batch["pixels"].to(self.device, torch.float32)
        down = self.preset.vae_downsample
        if self.crop_size is not None:
            pixels = random_crops(pixels, self.crop_size, down, generator)
        noise = make_noise((pixels.shape[0], self.preset.latent_channels, pixels.shape[2] // down,
                            pixels.shape[3] // down), 0.0, generator, self.device)
        recon, mean, logvar = model(pixels, noise)
        recon = recon.float()
        diff = recon - pixels
        rec = diff.abs().mean() if s["recon_loss"] == "l1" else diff.pow(2).mean()
        kl = kl_to_standard_normal(mean.float(), logvar.float()).mean() / pixels[0].numel()
        loss = rec + float(s["kl_weight"]) * kl
        metrics = {"rec_loss": float(rec.detach()), "kl": float(kl.detach()),
                   "psnr": float(10 * torch.log10(4.0 / diff.detach().pow(2).mean().clamp_min(1e-10)))}
        if float(s["edge_weight"]) > 0:
            e_loss = edge_loss(recon, pixels)
            loss = loss + float(s["edge_weight"]) * e_loss
            metrics["edge_loss"] = float(e_loss.detach())
        if self.perceptual is not None:
            p_loss = self.perceptual(recon, pixels).mean()
            loss = loss + float(s["lpips_weight"]) * p_loss
            metrics["lpips"] = float(p_loss.detach())
        step = int(batch.get("step", 0))
        if self.discriminator is not None and step >= int(s["gan_start_step"]):
            # Copies, not views: the discriminator step below updates its parameters in place before backward.
            detached = {name: p.detach().clone() for name, p in self.discriminator.named_parameters()}
            g_loss = -torch.func.functional_call(self.discriminator, detached, (recon,)).mean()
            loss = loss + float(s["gan_weight"]) * g_loss
            metrics["g_loss"] = float(g_loss.detach())
            metrics["d_loss"] = self._discriminator_step(pixels, recon.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def _fixed_inputs(self, count: int | None = None) -> torch.Tensor:
        """The first ``count`` (default ``num_samples``) selected samples (by key), center-cropped at
        ``loader.resolution``."""
        count = int(self.settings["num_samples"]) if count is None else int(count)
        samples = select_samples(self.cfg, dataset_dir_from_cfg(self.cfg)).head(count)
        reader = TarShardReader(dataset_dir_from_cfg(self.cfg))
        size = int(self.cfg.loader.resolution)
        try:
            images = [bucket_crop_resize(decode_rgb(reader.image_bytes(str(r["shard"]), sample_member(r))),
                                         (size, size), mode="center")[0] for r in samples.to_dict("records")]
        finally:
            reader.close()
        return torch.stack([pil_to_tensor(im) for im in images])

    @torch.no_grad()
    def sample_images(self, model: nn.Module, step: int) -> list:
        """Input ‖ reconstruction (posterior mean), side by side, for fixed dataset samples."""
        vae = getattr(getattr(model, "module", model), "vae", model)
        pixels = self._fixed_inputs().to(next(vae.parameters()).device)
        was_training = vae.training
        vae.eval()
        try:
            recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.float()
        finally:
            vae.train(was_training)
        pairs = torch.cat([pixels.float(), recon], dim=3)
        return to_pil((pairs / 2 + 0.5).clamp(0, 1))

    def save_pretrained(self, model: nn.Module, out_dir: str) -> None:
        """The AutoencoderKL folder, with the latent scale factor (1 / std of the latents, LDM's rule) measured on
        ``scale_samples`` dataset images and recorded in its config for every consumer (sdxl/latent_scale.py)."""
        inner = getattr(model, "module", model)
        vae = getattr(inner, "vae", inner)
        was_training = vae.training
        vae.eval()
        try:
            factor = measure_scaling_factor(vae, self._fixed_inputs(int(self.settings["scale_samples"])))
        finally:
            vae.train(was_training)
        vae.register_to_config(scaling_factor=factor)
        save_module_pretrained(vae, out_dir)

    def lineage_tags(self) -> dict[str, str]:
        tags = {"task": "vae", "preset": self.preset.name, "parent_checkpoint": self.init_path or "scratch",
                "gan": "off" if float(self.settings["gan_weight"]) <= 0 else f"from step {self.settings['gan_start_step']}",
                "lpips": self.perceptual_source or str(self.settings["lpips_weights"] or "off")}
        tags.update(data_lineage(self.cfg))
        return tags
