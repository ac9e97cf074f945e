"""Training diffusion: schedule, forward noising, timestep sampling, offset noise and the eps loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from sdxl.conditioner import Conditioning
from sdxl.diffusion import (REFINER_T_RANGE, default_schedule, diffusion_loss, make_noise, min_snr_weights,
                            q_sample, sample_timesteps, scaled_linear_schedule)


class RecordingUNet(torch.nn.Module):
    """A stand-in eps model: a 1x1 conv that also records the timesteps and conditioning it was called with."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.calls = []

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs, return_dict=True):
        self.calls.append((x.detach().clone(), t.clone(), encoder_hidden_states, added_cond_kwargs))
        return (self.conv(x),)


def _cond(batch: int) -> Conditioning:
    return Conditioning(torch.randn(batch, 77, 16), torch.randn(batch, 8), torch.zeros(batch, 6))


def test_schedule_matches_diffusers_ddpm_scaled_linear():
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    ours = default_schedule()
    assert ours.num_timesteps == 1000
    assert torch.equal(ours.betas, reference.betas)
    assert torch.equal(ours.alphas_cumprod, reference.alphas_cumprod)
    sigmas = ours.sigmas
    assert torch.all(sigmas[1:] > sigmas[:-1])  # noise grows monotonically with t
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-3) and sigmas[-1].item() == pytest.approx(14.61, abs=0.01)


def test_q_sample_matches_diffusers_add_noise():
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 199, 500, 999])
    assert torch.allclose(q_sample(x0, t, noise), reference.add_noise(x0, noise, t), atol=1e-6)
    # Scalar t broadcasts over the batch.
    assert torch.allclose(q_sample(x0, torch.tensor(10), noise), q_sample(x0, torch.full((5,), 10), noise))


@pytest.mark.parametrize("t, match", [
    (torch.tensor([1000, 0]), r"t must lie in \[0, 1000\)"),
    (torch.tensor([-1, 0]), r"t must lie in"),
    (torch.tensor([0.5, 1.0]), "integer timesteps"),
    (torch.tensor([1, 2, 3]), "one timestep per sample"),
])
def test_q_sample_rejects_bad_timesteps(t, match):
    with pytest.raises(ValueError, match=match):
        q_sample(torch.zeros(2, 4, 2, 2), t, torch.zeros(2, 4, 2, 2))


def test_q_sample_rejects_mismatched_noise():
    with pytest.raises(ValueError, match="same shape"):
        q_sample(torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]), torch.zeros(2, 4, 3, 3))


def test_sample_timesteps_ranges_and_determinism():
    t = sample_timesteps(4000, (0, 1000), torch.Generator().manual_seed(1))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    assert t.min() < 10 and t.max() > 990  # covers the whole range
    refiner = sample_timesteps(2000, REFINER_T_RANGE, torch.Generator().manual_seed(1))
    assert refiner.min() >= 0 and refiner.max() < 200 and refiner.max() > 190
    assert torch.equal(sample_timesteps(8, generator=torch.Generator().manual_seed(3)),
                       sample_timesteps(8, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("t_range", [(0, 1001), (200, 200), (-1, 5), (5, 1), "all", (0.5,)])
def test_sample_timesteps_rejects_bad_ranges(t_range):
    with pytest.raises(ValueError, match="t_range"):
        sample_timesteps(4, t_range)


def test_schedule_rejects_bad_betas():
    with pytest.raises(ValueError, match="beta_start"):
        scaled_linear_schedule(1000, 0.02, 0.01)
    with pytest.raises(ValueError, match="num_timesteps"):
        scaled_linear_schedule(0)


def test_offset_noise_statistics():
    shape, offset = (500, 4, 32, 32), 0.05
    plain = make_noise(shape, 0.0, torch.Generator().manual_seed(0))
    shifted = make_noise(shape, offset, torch.Generator().manual_seed(0))
    # Same draws for the per-pixel part; the difference is constant over H, W for each (sample, channel).
    diff = shifted - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    assert diff[:, :, 0, 0].std().item() == pytest.approx(offset, rel=0.1)
    # Variance of per-channel spatial means: 1/(H·W) for plain noise, plus offset² with the offset.
    hw = shape[2] * shape[3]
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / hw, rel=0.1)
    assert shifted.mean(dim=(2, 3)).var().item() == pytest.approx(1 / hw + offset**2, rel=0.1)
    assert shifted.std().item() == pytest.approx((1 + offset**2) ** 0.5, rel=0.01)


def test_make_noise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="offset_noise must be >= 0"):
        make_noise((1, 4, 8, 8), -0.1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        make_noise((4, 8), 0.05)


def _fixed_loss_inputs():
    """A recording UNet, 3 latents with their noise, timesteps on both sides of the refiner range, conditioning."""
    return RecordingUNet(), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 300, 900]), _cond(3)


def test_loss_is_plain_eps_mse_at_the_given_noise_and_timesteps():
    unet, latents, noise, t, cond = _fixed_loss_inputs()
    loss, stats = diffusion_loss(unet, latents, cond, timesteps=t, noise=noise)
    x_t, seen_t, context, added = unet.calls[0]
    assert torch.equal(seen_t, t) and context is cond.context and added["time_ids"] is cond.time_ids
    assert torch.allclose(x_t, q_sample(latents, t, noise))
    expected = ((unet.conv(x_t) - noise) ** 2).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert unet.conv.weight.grad is not None and unet.conv.weight.grad.abs().sum() > 0
    assert float(stats["loss"]) == pytest.approx(loss.item())
    assert float(stats["timestep_mean"]) == pytest.approx(t.float().mean().item())
    assert float(stats["loss_t_lt_200"]) == pytest.approx(((unet.conv(x_t[:1]) - noise[:1]) ** 2).mean().item(),
                                                          rel=1e-5)


def test_min_snr_weighting_scales_each_sample_by_min_snr_gamma_over_snr():
    unet, latents, noise, t, cond = _fixed_loss_inputs()
    uniform, _ = diffusion_loss(unet, latents, cond, timesteps=t, noise=noise)
    weighted, stats = diffusion_loss(unet, latents, cond, timesteps=t, noise=noise, snr_gamma=5.0)
    x_t = unet.calls[1][0]
    per_sample = ((unet.conv(x_t) - noise) ** 2).mean(dim=(1, 2, 3))
    alphas = default_schedule().alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    assert snr[0] > 5 > snr[2]  # t=5 is clamped to gamma, t=900 keeps weight 1
    weights = min_snr_weights(t, 5.0)
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[2] == 1 and weights[0] < 0.1
    assert torch.allclose(weighted, (per_sample * weights).mean())
    assert weighted < uniform
    # the logged per-range losses stay unweighted, comparable with runs that do not weight
    assert float(stats["loss_t_ge_200"]) == pytest.approx(per_sample[1:].mean().item(), rel=1e-5)
    # a gamma above every level's SNR weights nothing
    huge, _ = diffusion_loss(unet, latents, cond, timesteps=t, noise=noise, snr_gamma=1e9)
    assert torch.allclose(huge, uniform)
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weights(t, -1.0)


def test_loss_uses_the_refiner_range_and_is_reproducible():
    unet = RecordingUNet()
    latents = torch.randn(64, 4, 4, 4)
    first, _ = diffusion_loss(unet, latents, _cond(64), t_range=REFINER_T_RANGE,
                              generator=torch.Generator().manual_seed(9))
    t = unet.calls[-1][1]
    assert t.max() < 200
    second, stats = diffusion_loss(unet, latents, _cond(64), t_range=REFINER_T_RANGE,
                                   generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, second) and torch.equal(unet.calls[-1][1], t)
    assert torch.isnan(stats["loss_t_ge_200"])  # no sample above the refiner range: reported as NaN, not 0


def test_loss_with_tiny_sdxl_unet_is_finite():
    from sdxl.models import build_unet
    from sdxl.presets import get_preset

    preset = get_preset("tiny")
    unet = build_unet(preset, "base")
    cond = Conditioning(torch.randn(2, 77, preset.context_dim_base), torch.randn(2, preset.pooled_dim),
                        torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    loss, _ = diffusion_loss(unet, torch.randn(2, 4, 8, 8), cond, offset_noise=0.05,
                             generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(latents=torch.randn(2, 4, 8)), ValueError, r"latents must be a \[B, C, H, W\]"),
    (dict(cond=_cond(3)), ValueError, "cond has batch size 3, expected 2"),
    (dict(cond="text"), TypeError, "cond must be a sdxl.conditioner.Conditioning"),
    (dict(t_range=(0, 2000)), ValueError, "t_range"),
    (dict(noise=torch.randn(2, 4, 4, 4)), ValueError, "noise must match"),
    (dict(offset_noise=-1.0), ValueError, "offset_noise"),
])
def test_loss_rejects_bad_input(kwargs, error, match):
    args = dict(unet=RecordingUNet(), latents=torch.randn(2, 4, 8, 8), cond=_cond(2))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        diffusion_loss(**args)


def test_mismatched_conditioning_fields_are_named():
    bad = Conditioning(torch.randn(2, 77, 16), torch.randn(3, 8), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        diffusion_loss(RecordingUNet(), torch.randn(2, 4, 8, 8), bad)
