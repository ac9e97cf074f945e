"""The serving core without Ray: each class wraps one model and handles a *list* of requests at once.

The Serve deployments (``deployments.py``) hand these classes the lists ``@serve.batch`` collects. Inside a list,
requests are grouped by what must be equal to share one forward pass (latent shape, schedule, guidance,
micro-conditioning); each group runs as one batch. Determinism does not depend on who shares a batch: the initial
noise of image ``k`` of a request is drawn from its own seed (``seed + k``), exactly as ``sdxl.sampling`` draws it
for a single image, and the samplers (euler, ddim, dpmpp_2m) add no noise during the loop.

A group that fails is retried one request at a time, so one failing request cannot fail its batch partners; each
slot of the returned list holds a result or the exception of that request.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sdxl.conditioner import Conditioning
from sdxl.sampling import (
    LATENT_CHANNELS,
    LATENT_DOWNSAMPLE,
    SampleParams,
    decode_latents,
    ensemble_of_experts,
    initial_noise,
    refine_sdedit,
    sample_base,
)
from stages.serve.schema import GenerateRequest

log = logging.getLogger(__name__)


@dataclass
class EncodedPrompt:
    """Text conditioning of one request (batch 1 each, CPU tensors); refiner fields are None without a refiner."""

    base_cond: Conditioning
    base_uncond: Conditioning
    refiner_cond: Conditioning | None = None
    refiner_uncond: Conditioning | None = None


def group_indices(items: Sequence, key: Callable) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key(item)``, groups in order of first appearance."""
    groups: dict = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item), []).append(index)
    return list(groups.values())


def run_grouped(items: Sequence, key: Callable, run_group: Callable[[list], list]) -> list:
    """``run_group`` on each group of compatible items; results (or per-item exceptions) in input order.

    A failing group of several items is retried item by item, so only the item that fails gets the exception.
    """
    results: list = [None] * len(items)
    for indices in group_indices(items, key):
        try:
            outputs = run_group([items[i] for i in indices])
        except Exception as err:  # noqa: BLE001 - isolated per request below
            if len(indices) == 1:
                results[indices[0]] = err
                continue
            log.warning("batch of %d failed (%s); retrying one by one", len(indices), err)
            for i in indices:
                try:
                    results[i] = run_group([items[i]])[0]
                except Exception as single_err:  # noqa: BLE001
                    results[i] = single_err
            continue
        for i, out in zip(indices, outputs):
            results[i] = out
    return results


def _cat(conds: Sequence[Conditioning], repeats: Sequence[int]) -> Conditioning:
    parts = [c.repeat(n) for c, n in zip(conds, repeats)]
    return Conditioning(context=torch.cat([p.context for p in parts]), pooled=torch.cat([p.pooled for p in parts]),
                        time_ids=torch.cat([p.time_ids for p in parts]))


def _cpu(cond: Conditioning) -> Conditioning:
    return cond.to(device="cpu", dtype=torch.float32)


def _noise(requests: Sequence[GenerateRequest], down: int) -> torch.Tensor:
    """Unit-variance initial noise, one seed per image (``seed + k``), concatenated over requests; ``down`` is the
    VAE's pixels per latent."""
    shapes = [(1, LATENT_CHANNELS, r.height // down, r.width // down) for r in requests]
    return torch.cat([initial_noise(shape, s) for r, shape in zip(requests, shapes) for s in r.seeds])


def _split(latents: torch.Tensor, requests: Sequence[GenerateRequest]) -> list[torch.Tensor]:
    return list(torch.split(latents.detach().to("cpu", torch.float32), [r.num_images for r in requests]))


def sample_params(req: GenerateRequest, latent_downsample: int = LATENT_DOWNSAMPLE) -> SampleParams:
    return SampleParams(height=req.height, width=req.width, steps=req.steps, guidance_scale=req.guidance_scale,
                        sampler=req.sampler, seed=req.seed, original_size=req.original_size,
                        crop_coords=req.crop_coords, target_size=req.target_size,
                        latent_downsample=latent_downsample)


def _micro_key(req: GenerateRequest) -> tuple:
    # sdxl.sampling sets one set of time ids per call, so only requests with equal micro-conditioning share a batch.
    return (req.original_size, req.crop_coords, req.target_size, req.aesthetic_score, req.negative_aesthetic_score)


class TextEncoderCore:
    """Prompts → :class:`EncodedPrompt` with both text encoders (base: CLIP-L ‖ bigG; refiner: bigG only)."""

    def __init__(self, base_conditioner, refiner_conditioner):
        self.base = base_conditioner
        self.refiner = refiner_conditioner

    @torch.no_grad()
    def _encode_group(self, requests: list[GenerateRequest]) -> list[EncodedPrompt]:
        prompts = [r.prompt for r in requests]
        negatives = [r.negative_prompt for r in requests]
        first = requests[0]
        # Micro-conditioning in these time ids is replaced by the samplers' own; only the text parts matter here.
        cond, uncond = self.base.encode_for_sampling(prompts, negatives, original_size=first.original_size,
                                                     crop_coords=first.crop_coords, target_size=first.target_size)
        ref_cond = ref_uncond = None
        if first.refiner:
            ref_cond, ref_uncond = self.refiner.encode_for_sampling(
                prompts, negatives, original_size=first.original_size, crop_coords=first.crop_coords,
                aesthetic_score=first.aesthetic_score, negative_aesthetic_score=first.negative_aesthetic_score)
        out = []
        for i in range(len(requests)):
            sl = slice(i, i + 1)
            pick = (lambda c: None if c is None else _cpu(Conditioning(c.context[sl], c.pooled[sl], c.time_ids[sl])))
            out.append(EncodedPrompt(pick(cond), pick(uncond), pick(ref_cond), pick(ref_uncond)))
        return out

    def encode(self, requests: Sequence[GenerateRequest]) -> list:
        # Negatives are per request (None = the model's unconditional input), so only the refiner flag splits a call.
        return run_grouped(requests, lambda r: r.refiner, self._encode_group)


class BaseSamplerCore:
    """Text conditioning → base latents [num_images, 4, H/d, W/d] per request (the whole schedule); d is the VAE's
    pixels per latent (``latent_downsample``: 8 for SDXL's, 4 for the tiny preset's)."""

    def __init__(self, unet, latent_downsample: int = LATENT_DOWNSAMPLE):
        self.unet = unet
        self.latent_downsample = int(latent_downsample)

    @torch.no_grad()
    def _sample_group(self, jobs: list[tuple[GenerateRequest, EncodedPrompt]]) -> list[torch.Tensor]:
        requests = [req for req, _ in jobs]
        repeats = [req.num_images for req in requests]
        cond = _cat([enc.base_cond for _, enc in jobs], repeats)
        uncond = _cat([enc.base_uncond for _, enc in jobs], repeats)
        down = self.latent_downsample
        latents = sample_base(self.unet, cond, uncond, sample_params(requests[0], down), latents=_noise(requests, down))
        return _split(latents, requests)

    def sample(self, jobs: Sequence[tuple[GenerateRequest, EncodedPrompt]]) -> list:
        return run_grouped(jobs, lambda job: job[0].base_batch_key() + _micro_key(job[0]), self._sample_group)


class RefinerCore:
    """The refiner stage: SDEdit on base latents, or the ensemble-of-experts hand-off (which also needs the base
    UNet, since the hand-over happens inside one sampler loop: ``sdxl.sampling.ensemble_of_experts``)."""

    def __init__(self, refiner_unet, base_unet=None, latent_downsample: int = LATENT_DOWNSAMPLE):
        self.latent_downsample = int(latent_downsample)
        self.refiner_unet = refiner_unet
        self.base_unet = base_unet

    @torch.no_grad()
    def _sdedit_one(self, job) -> torch.Tensor:
        # refine_sdedit draws one noise tensor from one seed for its whole batch, so each image is refined with its
        # own seed on its own: the result then never depends on batch partners (or on num_images).
        req, enc, latents = job
        outputs = []
        for k, seed in enumerate(req.seeds):
            outputs.append(refine_sdedit(
                self.refiner_unet, latents[k:k + 1], enc.refiner_cond, enc.refiner_uncond,
                strength=req.refiner_strength, steps=req.steps, guidance_scale=req.guidance_scale,
                sampler=req.sampler, seed=seed, original_size=req.original_size, crop_coords=req.crop_coords,
                aesthetic_score=req.aesthetic_score, negative_aesthetic_score=req.negative_aesthetic_score))
        return torch.cat(outputs).detach().to("cpu", torch.float32)

    @torch.no_grad()
    def _ensemble_group(self, jobs) -> list[torch.Tensor]:
        if self.base_unet is None:
            raise RuntimeError("ensemble-of-experts requests need serve.refiner.ensemble=true (a base UNet on the "
                               "refiner replicas)")
        requests = [req for req, _, _ in jobs]
        repeats = [req.num_images for req in requests]
        first = requests[0]
        latents = ensemble_of_experts(
            self.base_unet, self.refiner_unet,
            _cat([e.base_cond for _, e, _ in jobs], repeats), _cat([e.base_uncond for _, e, _ in jobs], repeats),
            _cat([e.refiner_cond for _, e, _ in jobs], repeats), _cat([e.refiner_uncond for _, e, _ in jobs], repeats),
            sample_params(first, self.latent_downsample), high_noise_frac=first.high_noise_frac,
            aesthetic_score=first.aesthetic_score, negative_aesthetic_score=first.negative_aesthetic_score,
            latents=_noise(requests, self.latent_downsample))
        return _split(latents, requests)

    def _run_group(self, jobs) -> list[torch.Tensor]:
        if jobs[0][0].refiner_mode == "ensemble":
            return self._ensemble_group(jobs)
        return [self._sdedit_one(job) for job in jobs]

    def refine(self, jobs: Sequence[tuple]) -> list:
        """``jobs``: (request, EncodedPrompt, base latents or None for ensemble requests)."""
        return run_grouped(jobs, lambda job: job[0].refiner_batch_key() + _micro_key(job[0]), self._run_group)


class DecoderCore:
    """Latents → uint8 images [n, H, W, 3] with the VAE (float32)."""

    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def _decode_group(self, latents_list: list[torch.Tensor]) -> list[np.ndarray]:
        sizes = [lat.shape[0] for lat in latents_list]
        images = decode_latents(self.vae, torch.cat(latents_list))
        return [to_uint8(part) for part in torch.split(images, sizes)]

    def decode(self, latents_list: Sequence[torch.Tensor]) -> list:
        return run_grouped(latents_list, lambda lat: tuple(lat.shape[1:]), self._decode_group)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] → [B, H, W, 3] uint8 (the rounding of ``sdxl.sampling.to_pil``)."""
    return (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    """One [H, W, 3] uint8 image → PNG or JPEG (quality 95) bytes."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(array, mode="RGB")
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"format must be png or jpeg, got {fmt!r}")
    return buf.getvalue()


MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


class Stopwatch:
    """Seconds per named stage of one request (reported as ``timings``)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._last = self.start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[f"{name}_s"] = round(now - self._last, 4)
        self._last = now

    def total(self) -> dict[str, float]:
        return {**self.timings, "total_s": round(time.perf_counter() - self.start, 4)}
