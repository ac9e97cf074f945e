"""Classifier-free guidance for eps-prediction UNets.

Convention: ``guidance_scale`` as in diffusers, ``eps = eps_u + s·(eps_c − eps_u)``. The SDXL report (and sgm's
``VanillaCFG``) writes the same thing as ``D = (1 + w)·D(c) − w·D(∅)``; the two agree with ``s = 1 + w``
(:func:`sgm_weight_to_guidance_scale`). ``s = 1`` is the plain conditional model and runs one pass; ``s = 0`` is the
unconditional model. Unlike diffusers, which switches guidance off for every ``s <= 1``, scales in (0, 1) are applied
as the formula says (an interpolation between the two models).

Conditional and unconditional inputs go through the UNet as one batch (``[uncond, cond]``, diffusers' order).
"""

from __future__ import annotations

import math
import numbers
from contextlib import nullcontext

import torch

from sdxl.conditioner import Conditioning
from sdxl.diffusion import cast_for_model, check_conditioning, module_dtype


def sgm_weight_to_guidance_scale(w: float) -> float:
    """sgm / paper weight ``w`` in ``(1+w)·D(c) − w·D(∅)`` → diffusers' ``guidance_scale``."""
    return 1.0 + w


def guidance_scale_to_sgm_weight(scale: float) -> float:
    return scale - 1.0


def combine_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def check_guidance_scale(guidance_scale, name: str = "guidance_scale") -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
        raise ValueError(f"{name} must be a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {guidance_scale}")
    return float(guidance_scale)


def module_device(module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class GuidedDenoiser:
    """``eps(x_t, t)`` with classifier-free guidance; conditionings are batched and moved to the UNet once.

    ``cond`` and ``uncond`` must have the batch size of the latents (an ``uncond`` of batch 1 is broadcast).
    A float32 UNet on CUDA runs under bf16 autocast; the prediction is returned in float32 for the scheduler.
    """

    def __init__(self, unet, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float):
        self.unet = unet
        self.guidance_scale = check_guidance_scale(guidance_scale)
        check_conditioning(cond, None, "cond")
        self.batch = cond.context.shape[0]
        if uncond is not None:
            check_conditioning(uncond, None, "uncond")
            if uncond.context.shape[0] == 1 and self.batch > 1:
                uncond = uncond.repeat(self.batch)
            check_conditioning(uncond, self.batch, "uncond")
        elif self.guidance_scale != 1.0:
            raise ValueError(f"uncond is required when guidance_scale != 1 (got {self.guidance_scale})")
        device, self.dtype = module_device(unet), module_dtype(unet)
        self.device = device
        if self.guidance_scale == 1.0:
            self.mode, batched = "cond", cond
        elif self.guidance_scale == 0.0:
            self.mode, batched = "uncond", uncond
        else:
            self.mode, batched = "cfg", uncond.cat(cond)
        self.kwargs = cast_for_model(batched, self.dtype, device).unet_kwargs()

    def _autocast(self):
        # A float32 UNet on CUDA computes in bf16 (as it trained); a UNet already in bf16/fp16 runs as it is.
        if self.device.type == "cuda" and self.dtype == torch.float32:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def __call__(self, model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if model_input.shape[0] != self.batch:
            raise ValueError(f"latents have batch {model_input.shape[0]}, conditioning has {self.batch}")
        x = torch.cat([model_input, model_input]) if self.mode == "cfg" else model_input
        with self._autocast():
            eps = self.unet(x.to(self.dtype), t, **self.kwargs, return_dict=False)[0]
        eps = eps.float()
        if self.mode != "cfg":
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        return combine_guidance(eps_uncond, eps_cond, self.guidance_scale)
