"""What the evaluation samples with: the checkpoint to evaluate, and images for prompts over guidance scales.

Checkpoint (``evaluate.checkpoint``):
- null — the newest existing ``<root>/runs/<stage>/final/ema`` of finetune_quality, finetune_aspect, pretrain512,
  pretrain256 (``train_vae`` for ``evaluate.kind=vae``);
- a folder — a module folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a training stage's
  ``final/`` folder (its ``ema/`` is used); relative paths are under ``paths.root``;
- ``models:/<name>/<version>`` — an MLflow registered model version (a training stage registers ``final/ema``);
- none found and ``evaluate.allow_random=true`` — the preset's random init (plumbing runs only).

The frozen parts (VAE, text encoders) are built exactly as the training stages build them
(``stages.train.task_components``), so a checkpoint is evaluated with the encoders it was trained against.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pipeline import storage

log = logging.getLogger(__name__)

BASE_STAGES = ("finetune_quality", "finetune_aspect", "pretrain512", "pretrain256")  # newest first
VAE_STAGES = ("train_vae",)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass
class CheckpointRef:
    """Where the evaluated weights are: ``folder`` (local or URI) or None for random init; ``info`` is the
    training stage's ``final/info.json`` when there is one."""

    description: str
    folder: str | None = None
    info: dict = field(default_factory=dict)
    tag: str = ""  # the output folder name under runs/evaluate/ (default: from the description)

    @property
    def training_run_id(self) -> str | None:
        run_id = self.info.get("mlflow_run_id")
        return str(run_id) if run_id else None


def _is_module_dir(uri: str) -> bool:
    return storage.is_file(storage.join(uri, "config.json")) and storage.is_file(storage.join(uri, WEIGHTS_FILE))


def _read_info(module_dir: str) -> dict:
    """``final/info.json`` beside ``final/ema`` (or inside a downloaded MLflow artifact folder's parent)."""
    parent = module_dir.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(module_dir) else \
        os.path.dirname(os.path.abspath(module_dir.rstrip("/")))
    for candidate in (storage.join(parent, "info.json"), storage.join(module_dir, "info.json")):
        if storage.is_file(candidate):
            try:
                return dict(storage.read_json(candidate))
            except (OSError, ValueError) as err:
                log.warning("unreadable %s: %s", candidate, err)
    return {}


def _model_version(uri: str, tracking_uri: str | None):
    """(client, the ModelVersion that ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` names)."""
    import mlflow

    if not tracking_uri:
        raise ValueError(f"evaluate.checkpoint={uri} is an MLflow model URI but no MLflow tracking URI is known")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    body = uri[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return client, client.get_model_version_by_alias(name, alias)
    parts = body.split("/")
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"evaluate.checkpoint={uri}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return client, client.get_model_version(*parts)


def _download_model_version(uri: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """(local folder with the version's files, the run that registered it). The version's storage location is
    resolved through our client: mlflow's ``models:/`` artifact repository reads the global registry URI instead."""
    import mlflow.artifacts

    client, version = _model_version(uri, tracking_uri)
    source = client.get_model_version_download_uri(version.name, version.version)
    dst = tempfile.mkdtemp(prefix="sdxl-eval-model-")
    folder = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri)
    return folder, version.run_id


def resolve_checkpoint(value, root: str, kind: str = "base", allow_random: bool = False,
                       tracking_uri: str | None = None) -> CheckpointRef:
    """Find the weights to evaluate; see the module doc. A miss names every place looked at."""
    stages = VAE_STAGES if kind == "vae" else BASE_STAGES
    if value is None or str(value).strip().lower() in ("", "null", "none", "auto"):
        looked = [storage.join(root, "runs", stage, "final", "ema") for stage in stages]
        for folder, stage in zip(looked, stages):
            if _is_module_dir(folder):
                return CheckpointRef(f"{stage}/final/ema", folder, _read_info(folder))
        if allow_random:
            return CheckpointRef("random init (evaluate.allow_random=true)", tag="random_init")
        raise FileNotFoundError("evaluate.checkpoint: no trained checkpoint found at " + ", ".join(looked)
                                + "; run a training stage first, set evaluate.checkpoint=PATH or models:/NAME/N, "
                                  "or evaluate.allow_random=true for a plumbing run")
    value = str(value)
    if value.startswith("models:/"):
        folder, run_id = _download_model_version(value, tracking_uri)
        if not _is_module_dir(folder):
            raise FileNotFoundError(f"evaluate.checkpoint={value}: the downloaded artifacts at {folder} hold no "
                                    f"{WEIGHTS_FILE} + config.json")
        info = _read_info(folder)
        run_id = info.get("mlflow_run_id") or run_id
        if run_id:
            info["mlflow_run_id"] = run_id
        return CheckpointRef(value, folder, info)
    if not storage.is_remote(value) and not os.path.isabs(value) and not value.startswith("file://"):
        candidate = storage.join(root, value)
        value = candidate if storage.exists(candidate) else value
    for folder in (value, storage.join(value, "ema")):
        if _is_module_dir(folder):
            return CheckpointRef(folder, folder, _read_info(folder))
    raise FileNotFoundError(f"evaluate.checkpoint={value}: neither it nor its ema/ holds config.json and "
                            f"{WEIGHTS_FILE} (expected e.g. <root>/runs/<stage>/final/ema)")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_unet(ref: CheckpointRef, cfg, device: torch.device):
    """The base UNet of ``cfg.model.preset`` with the checkpoint's weights (random init without a folder)."""
    from sdxl.models import build_unet
    from stages.train.tasks import load_module_weights

    unet = build_unet(str(cfg.model.preset), "base", seed=int((cfg.get("train") or {}).get("seed", 0) or 0))
    if ref.folder is not None:
        load_module_weights(unet, ref.folder)
    return unet.to(device).eval().requires_grad_(False)


@dataclass
class Generator:
    """A base UNet with its frozen VAE and text conditioner, and the sampling settings of the evaluation."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    conditioner: torch.nn.Module
    vae_scale_factor: float
    resolution: int
    steps: int
    sampler: str
    seed: int
    sources: dict = field(default_factory=dict)


def build_generator(ref: CheckpointRef, cfg, device: torch.device) -> Generator:
    from sdxl.conditioner import UNCONDITIONAL_ZEROS, resolve_unconditional_kind
    from sdxl.latent_scale import vae_scaling_factor
    from stages.train.task_components import build_frozen_parts

    unet = load_unet(ref, cfg, device)
    frozen = build_frozen_parts(cfg, "base", device)
    # Guidance needs the unconditional input the checkpoint was trained with (its final/info.json records it).
    recorded = (ref.info.get("lineage") or {}).get("unconditional")
    frozen.conditioner.force_zeros_for_empty_prompt = resolve_unconditional_kind(
        recorded, "base", f"{ref.description} info.json") == UNCONDITIONAL_ZEROS
    ev = cfg.evaluate
    return Generator(unet=unet, vae=frozen.vae, conditioner=frozen.conditioner,
                     vae_scale_factor=vae_scaling_factor(frozen.vae),
                     resolution=int(ev.resolution), steps=int(ev.steps), sampler=str(ev.sampler), seed=int(ev.seed),
                     sources={"unet": ref.description, "vae": frozen.vae_source, "text": frozen.text_source})


@torch.no_grad()
def generate_batches(gen: Generator, prompts: list[str], guidance_scale: float,
                     batch_size: int = 4) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(images [n, 3, r, r] in [0, 1] (float32, CPU), their prompts) one sampling batch at a time.

    Batch ``i`` is seeded with ``seed + i``, the same at every scale, so scales differ only in guidance. Micro-
    conditioning is the evaluation size with crop (0, 0), as at inference; the negative side is the model's
    unconditional input (no negative prompt)."""
    from sdxl.latent_scale import vae_downsample
    from sdxl.sampling import SampleParams, decode_latents, sample_base

    if batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be >= 1, got {batch_size}")
    size = (gen.resolution, gen.resolution)
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        cond, uncond = gen.conditioner.encode_for_sampling(batch, original_size=size, target_size=size)
        params = SampleParams(height=size[0], width=size[1], steps=gen.steps, guidance_scale=float(guidance_scale),
                              sampler=gen.sampler, seed=gen.seed + index,
                              latent_downsample=vae_downsample(gen.vae))
        latents = sample_base(gen.unet, cond, uncond, params)
        yield decode_latents(gen.vae, latents, gen.vae_scale_factor).cpu(), list(batch)


def prompts_for(prompts: list[str], num_images: int) -> list[str]:
    """``num_images`` prompts cycling through the held-out prompts (several images per prompt when there are few)."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    if num_images < 2:
        raise ValueError(f"evaluate.num_images must be >= 2 (FID needs two samples), got {num_images}")
    return [prompts[i % len(prompts)] for i in range(num_images)]
