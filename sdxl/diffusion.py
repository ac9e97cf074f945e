"""SDXL's training diffusion: the discrete DDPM schedule, forward noising and the eps-prediction loss (Sec. 2.5).

The schedule is the 1000-step "scaled linear" one of SD/SDXL (betas linear in sqrt space from 0.00085 to 0.012),
computed exactly as diffusers' ``DDPMScheduler(beta_schedule="scaled_linear")`` does, so training noise levels and
the samplers in :mod:`sdxl.sampling` agree to the bit.

Loss: the paper writes it as a σ-weighted denoiser loss with λ_σ = σ⁻²; for an eps-parameterised model that
weighting makes it exactly the plain MSE between predicted and true noise, which is what ``diffusion_loss`` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from sdxl.conditioner import Conditioning

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
# The refiner is trained on the first 200 (least noisy) of the 1000 levels.
REFINER_T_RANGE = (0, 200)


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep tensors of a discrete variance-preserving schedule (float32, CPU; moved on use)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t): the noise level in the "x0 + σ·eps" (Karras/EDM) view the samplers use."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise, one timestep per sample."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
        t = _check_timesteps(t, x0.shape[0], self.num_timesteps).to(x0.device)
        ac = self.alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t]
        shape = (-1,) + (1,) * (x0.ndim - 1)
        sqrt_ac = ac.sqrt().reshape(shape)
        sqrt_one_minus = (1 - ac).sqrt().reshape(shape)
        # Computed in float32 (as diffusers does), returned in the input dtype.
        return (sqrt_ac * x0.float() + sqrt_one_minus * noise.float()).to(x0.dtype)


def scaled_linear_schedule(num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                           beta_end: float = BETA_END) -> NoiseSchedule:
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2
    return NoiseSchedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))


@lru_cache(maxsize=1)
def default_schedule() -> NoiseSchedule:
    """SDXL's training schedule (1000 steps, scaled linear 0.00085 → 0.012)."""
    return scaled_linear_schedule()


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule | None = None):
    """Forward-noise ``x0`` to timesteps ``t`` (shape [B]) with ``noise`` under ``schedule`` (SDXL's by default)."""
    return (schedule or default_schedule()).q_sample(x0, t, noise)


def _check_timesteps(t: torch.Tensor, batch: int, num_timesteps: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"t must be a scalar or shape [{batch}] (one timestep per sample), got {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}")
    if batch and (int(t.min()) < 0 or int(t.max()) >= num_timesteps):
        raise ValueError(f"t must lie in [0, {num_timesteps}), got min {int(t.min())}, max {int(t.max())}")
    return t.long()


def check_t_range(t_range, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in t_range)
    except (TypeError, ValueError) as err:
        raise ValueError(f"t_range must be a pair (low, high) of integers, got {t_range!r}") from err
    if not 0 <= lo < hi <= num_timesteps:
        raise ValueError(f"t_range must satisfy 0 <= low < high <= {num_timesteps}, got {t_range!r}")
    return lo, hi


def sample_timesteps(batch: int, t_range=(0, NUM_TRAIN_TIMESTEPS), generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, num_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """Uniform integer timesteps in ``[low, high)``: (0, 1000) for the base, (0, 200) for the refiner."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    lo, hi = check_t_range(t_range, num_timesteps)
    t = torch.randint(lo, hi, (batch,), generator=generator, device=_generator_device(generator, device))
    return t.to(device) if device is not None else t


def make_noise(shape, offset_noise: float = 0.0, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise, plus "offset noise": ``offset_noise``·N(0, 1) per (sample, channel), constant over H and W.

    The offset shifts each channel's mean, which lets the model learn to change an image's overall brightness
    (plain noise never perturbs the lowest frequency much). SDXL's aspect fine-tuning uses 0.05.
    """
    shape = tuple(int(s) for s in shape)
    if offset_noise < 0:
        raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
    if offset_noise > 0 and len(shape) != 4:
        raise ValueError(f"offset noise needs a [B, C, H, W] shape, got {shape}")
    gen_device = _generator_device(generator, device)
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    if offset_noise > 0:
        offset = torch.randn(shape[:2] + (1, 1), generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise + offset_noise * offset
    return noise.to(device=device if device is not None else gen_device, dtype=dtype)


def _generator_device(generator: torch.Generator | None, device) -> torch.device:
    # A generator only draws on its own device; draw there and move, so a CPU generator works with CUDA tensors.
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def diffusion_loss(unet, latents: torch.Tensor, cond: Conditioning, schedule: NoiseSchedule | None = None,
                   t_range=(0, NUM_TRAIN_TIMESTEPS), offset_noise: float = 0.0,
                   generator: torch.Generator | None = None, *, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, snr_gamma: float | None = None) -> tuple[torch.Tensor, dict]:
    """Eps-prediction loss for one batch: sample t and noise, noise the latents, MSE(unet(x_t, t, c), noise).

    ``latents`` are VAE latents already multiplied by the scale factor. ``timesteps``/``noise`` may be given
    explicitly (tests, evaluation at fixed levels); otherwise they are drawn from ``generator``.
    ``snr_gamma``: Min-SNR-γ weighting (Hang et al. 2023), each sample's MSE times min(SNR_t, γ) / SNR_t, which
    stops the low-noise levels from dominating the gradient; None = SDXL's uniform weighting.
    Returns the scalar loss (float32, with grad) and detached 0-dim tensors for logging (call ``float()`` on them
    when logging, so a training step does not force a device sync).
    """
    schedule = schedule or default_schedule()
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents must be a [B, C, H, W] tensor, got {getattr(latents, 'shape', type(latents))}")
    batch = latents.shape[0]
    check_conditioning(cond, batch, "cond")
    lo, hi = check_t_range(t_range, schedule.num_timesteps)
    if timesteps is None:
        timesteps = sample_timesteps(batch, (lo, hi), generator, latents.device, schedule.num_timesteps)
    else:
        timesteps = _check_timesteps(timesteps, batch, schedule.num_timesteps).to(latents.device)
    if noise is None:
        noise = make_noise(latents.shape, offset_noise, generator, latents.device, torch.float32)
    elif noise.shape != latents.shape:
        raise ValueError(f"noise must match latents' shape {tuple(latents.shape)}, got {tuple(noise.shape)}")
    noisy = schedule.q_sample(latents.float(), timesteps, noise.float())
    model_dtype = module_dtype(unet)
    model_cond = cast_for_model(cond, model_dtype, latents.device)
    pred = unet(noisy.to(model_dtype), timesteps, **model_cond.unet_kwargs(), return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = 1.0 if snr_gamma is None else min_snr_weights(timesteps, snr_gamma, schedule)
    loss = (per_sample * weights).mean()
    stats = {
        "loss": loss.detach(),
        "timestep_mean": timesteps.float().mean(),
        "pred_std": pred.detach().float().std(),
        # Loss split at the refiner boundary: shows how the low-noise (detail) regime trains vs the rest.
        "loss_t_lt_200": _masked_mean(per_sample.detach(), timesteps < REFINER_T_RANGE[1]),
        "loss_t_ge_200": _masked_mean(per_sample.detach(), timesteps >= REFINER_T_RANGE[1]),
    }
    return loss, stats


def check_snr_gamma(gamma) -> float | None:
    """``train.snr_gamma`` as a float > 0, or None (uniform weighting); anything else is a clear error."""
    if gamma is None:
        return None
    if float(gamma) <= 0:
        raise ValueError(f"train.snr_gamma must be > 0 (e.g. 5.0) or null, got {gamma!r}")
    return float(gamma)


def min_snr_weights(timesteps: torch.Tensor, gamma: float, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """Min-SNR-γ loss weights for eps-prediction: min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 − ᾱ_t)."""
    gamma = check_snr_gamma(gamma)
    if gamma is None:
        raise ValueError("min_snr_weights needs a gamma; pass snr_gamma=None to diffusion_loss for uniform weights")
    schedule = schedule or default_schedule()
    alphas = schedule.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def check_conditioning(cond: Conditioning, batch: int | None, name: str = "cond") -> None:
    """Clear errors for a malformed :class:`Conditioning` (wrong type, ranks or batch sizes)."""
    if not isinstance(cond, Conditioning):
        raise TypeError(f"{name} must be a sdxl.conditioner.Conditioning, got {type(cond).__name__}")
    ranks = {"context": 3, "pooled": 2, "time_ids": 2}
    for field, rank in ranks.items():
        value = getattr(cond, field)
        if not isinstance(value, torch.Tensor) or value.ndim != rank:
            raise ValueError(f"{name}.{field} must be a {rank}-d tensor, got {getattr(value, 'shape', type(value))}")
    sizes = {cond.context.shape[0], cond.pooled.shape[0], cond.time_ids.shape[0]}
    if len(sizes) != 1:
        raise ValueError(f"{name}: context, pooled and time_ids disagree on the batch size: {sorted(sizes)}")
    if batch is not None and cond.context.shape[0] != batch:
        raise ValueError(f"{name} has batch size {cond.context.shape[0]}, expected {batch}")


def cast_for_model(cond: Conditioning, dtype: torch.dtype, device=None) -> Conditioning:
    """Text tensors in the model's dtype; time_ids stay float32, since bf16 would round sizes such as 1237 to 1232
    before the UNet's Fourier embedding (which computes in float32 anyway)."""
    return Conditioning(context=cond.context.to(device=device, dtype=dtype),
                        pooled=cond.pooled.to(device=device, dtype=dtype),
                        time_ids=cond.time_ids.to(device=device, dtype=torch.float32))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked entries; NaN when none (so a logger shows "no samples", not a fake 0)."""
    count = mask.sum()
    return torch.where(count > 0, (values * mask).sum() / count.clamp(min=1), torch.full_like(values[0], float("nan")))


def module_dtype(module) -> torch.dtype:
    """The dtype a module computes in (its ``dtype`` attribute, else its first parameter's; float32 if neither)."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return next(module.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32
