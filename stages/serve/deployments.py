"""Ray Serve deployments around the serving core (``engine.py``): one per model, composed by the ingress.

The split follows the models, so each scales on its own (``cfg.serve.deployments.<name>``: replicas, actor options,
autoscaling): ``TextEncoder`` (CLIP-L + bigG, small and fast), ``BaseSampler`` (the 2.6B base UNet, where the time
goes), ``Refiner`` (the refiner UNet; with ``serve.refiner_ensemble`` also a copy of the base UNet, because the
ensemble-of-experts hand-over happens inside one sampler loop) and ``Decoder`` (the VAE, float32). Each model
deployment batches the calls it receives with ``@serve.batch`` (``cfg.serve.batching``); the batch handler runs the
torch work in a thread so the replica keeps queueing the next batch meanwhile. Tensors cross replicas on the CPU.

Each batched deployment records the sizes of the batches it ran (``batch_sizes()``, callable through a handle).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from ray import serve

from stages.serve.engine import BaseSamplerCore, DecoderCore, RefinerCore, TextEncoderCore
from stages.serve.loading import ModelSources, load_text_conditioners, load_unet, load_vae

log = logging.getLogger(__name__)

_BATCH_HISTORY = 10_000  # batch sizes kept per replica (bounded: a long-running server must not grow)


def _raise_if_error(result):
    if isinstance(result, BaseException):
        raise result
    return result


def _configure_threads(num_threads: int | None) -> None:
    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))


class _Batched:
    """What every batched model deployment shares: batch settings from config and the batch-size record."""

    def _setup_batching(self, batching: dict, handler) -> None:
        self._handler = handler
        self._sizes: deque[int] = deque(maxlen=_BATCH_HISTORY)
        self._seconds: deque[float] = deque(maxlen=_BATCH_HISTORY)
        self.set_batching(int(batching.get("max_batch_size", 8)), float(batching.get("batch_wait_timeout_s", 0.05)))

    def set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Change the batch settings of this replica at run time (benchmarks compare batch sizes this way)."""
        self._handler.set_max_batch_size(int(max_batch_size))
        self._handler.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    async def _run(self, func, items: list) -> list:
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(func, items)
        finally:
            self._sizes.append(len(items))
            self._seconds.append(time.perf_counter() - started)

    def batch_sizes(self) -> list[int]:
        """Sizes of the batches this replica ran, oldest first."""
        return list(self._sizes)

    def batch_seconds(self) -> list[float]:
        """Compute seconds of those batches (same order as ``batch_sizes``)."""
        return list(self._seconds)

    def reset_batch_sizes(self) -> None:
        self._sizes.clear()
        self._seconds.clear()

    def ready(self) -> bool:
        """Replicas only take calls once ``__init__`` (model loading) has finished, so answering means loaded."""
        return True


@serve.deployment(name="TextEncoder")
class TextEncoder(_Batched):
    def __init__(self, sources: ModelSources, batching: dict, num_threads: int | None = None):
        _configure_threads(num_threads)
        self.core = TextEncoderCore(*load_text_conditioners(sources))
        self._setup_batching(batching, self._encode_batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _encode_batch(self, requests: list) -> list:
        return await self._run(self.core.encode, requests)

    async def encode(self, request):
        """GenerateRequest → EncodedPrompt."""
        return _raise_if_error(await self._encode_batch(request))


@serve.deployment(name="BaseSampler")
class BaseSampler(_Batched):
    def __init__(self, sources: ModelSources, batching: dict, num_threads: int | None = None):
        _configure_threads(num_threads)
        self.core = BaseSamplerCore(load_unet(sources, "base"), sources.latent_downsample())
        self._setup_batching(batching, self._sample_batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _sample_batch(self, jobs: list) -> list:
        return await self._run(self.core.sample, jobs)

    async def sample(self, request, encoded):
        """(GenerateRequest, EncodedPrompt) → latents [num_images, 4, H/d, W/d] (CPU, float32; d: the VAE's
        pixels per latent)."""
        return _raise_if_error(await self._sample_batch((request, encoded)))


@serve.deployment(name="Refiner")
class Refiner(_Batched):
    def __init__(self, sources: ModelSources, batching: dict, num_threads: int | None = None,
                 ensemble: bool = True):
        _configure_threads(num_threads)
        base = load_unet(sources, "base") if ensemble else None
        self.core = RefinerCore(load_unet(sources, "refiner"), base, sources.latent_downsample())
        self._setup_batching(batching, self._refine_batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _refine_batch(self, jobs: list) -> list:
        return await self._run(self.core.refine, jobs)

    async def refine(self, request, encoded, latents=None):
        """SDEdit of base ``latents``, or (``latents=None``, ensemble requests) the whole base + refiner schedule."""
        return _raise_if_error(await self._refine_batch((request, encoded, latents)))


@serve.deployment(name="Decoder")
class Decoder(_Batched):
    def __init__(self, sources: ModelSources, batching: dict, num_threads: int | None = None):
        _configure_threads(num_threads)
        self.core = DecoderCore(load_vae(sources))
        self._setup_batching(batching, self._decode_batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _decode_batch(self, latents_list: list) -> list:
        return await self._run(self.core.decode, latents_list)

    async def decode(self, latents):
        """Latents [n, 4, h, w] → uint8 images [n, d·h, d·w, 3] (d: the VAE's pixels per latent)."""
        return _raise_if_error(await self._decode_batch(latents))
