"""What a training stage trains: the :class:`TrainTask` interface the trainer calls, and ``make_task(cfg)``.

One task per stage kind (``train.task``): ``base`` / ``refiner`` (stages/train/task_diffusion.py) and ``vae``
(stages/train/task_vae.py). The trainer (stages/train/trainer.py) owns the loop, the strategy (DDP / FSDP2 /
DeepSpeed), EMA, checkpoints and logging; a task owns the model, its frozen helpers and the loss.

Shared here: where a parent's weights live (``train.init_from``), loading them with an error that names the file,
and the lineage tags every task reports.
"""

from __future__ import annotations

import abc
import hashlib
import os
import tempfile

import torch
from torch import nn

from pipeline import storage
from sdxl.checkpoint import load_into
from stages.train.data_manifest import MANIFEST_NAME, dataset_dir_from_cfg, latent_cache_dir, manifest_fingerprint

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what ``save_pretrained`` writes for UNets and VAEs
TASK_KINDS = ("base", "refiner", "vae")

# Task settings under `train.` with their defaults (stage YAMLs set the ones that differ per stage).
TASK_DEFAULTS = {
    "task": "base",
    "init_from": None,  # null | auto | <path to a diffusers module folder>
    "parent_stage": None,  # the stage whose final/ema `init_from: auto` loads
    "vae_from": "auto",  # frozen VAE: auto = runs/train_vae/final/ema when it exists, else model.pretrained / preset
    "seed": 0,  # random init of whatever is built from scratch
    "ucg_rate": 0.1,  # CFG dropout per text encoder (Sec. 2.5 / SPEC)
    "ucg_joint": False,  # true: both encoders dropped together (the demo recipe; docs/decisions.md)
    "offset_noise": 0.0,
    "snr_gamma": None,  # Min-SNR-γ loss weighting (e.g. 5.0); null = uniform, as SDXL trains
    "t_range": [0, 1000],
    "size_conditioning": True,  # false: c_size is the training crop's size (the paper's no-size-conditioning ablation)
    "frozen_dtype": "float32",  # text encoders' dtype (the VAE always runs in float32)
}


def task_option(cfg, key: str):
    """``cfg.train.<key>``, or its default from :data:`TASK_DEFAULTS`."""
    train = cfg.get("train") or {}
    return train.get(key, TASK_DEFAULTS.get(key))


class TrainTask(abc.ABC):
    """The trainer-facing interface of one kind of training stage."""

    model_name: str  # the registered MLflow model name: "base" | "refiner" | "vae"

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The trainable module, initialised (from scratch or the parent's weights), on CPU, in train mode."""

    @abc.abstractmethod
    def setup(self, device: torch.device) -> None:
        """Build the frozen helpers (VAE, text encoders, ...) on ``device``, in eval mode without grad."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of one micro-batch (with grad) and float metrics for logging."""

    @abc.abstractmethod
    def wrap_units(self, model: nn.Module) -> list[nn.Module]:
        """Blocks to shard (FSDP2 ``fully_shard``) or checkpoint (activation checkpointing) one by one."""

    @abc.abstractmethod
    def sample_images(self, model: nn.Module, step: int) -> list:
        """PIL images from fixed prompts / seeds (or fixed inputs), for the sample grid at ``step``."""

    @abc.abstractmethod
    def save_pretrained(self, model: nn.Module, out_dir: str) -> None:
        """Write an unwrapped module in the diffusers layout (``config.json`` + safetensors) to ``out_dir``."""

    @abc.abstractmethod
    def lineage_tags(self) -> dict[str, str]:
        """Where the weights and data came from: parent checkpoint path, manifest content hash, ..."""


def make_task(cfg) -> TrainTask:
    kind = str(task_option(cfg, "task"))
    if kind in ("base", "refiner"):
        from stages.train.task_diffusion import DiffusionTask

        return DiffusionTask(cfg, kind)
    if kind == "vae":
        from stages.train.task_vae import VAETask

        return VAETask(cfg)
    raise ValueError(f"train.task must be one of {list(TASK_KINDS)}, got {kind!r}")


def final_dir(cfg, stage: str, which: str = "ema") -> str:
    """``<root>/runs/<stage>/final/<which>``: where a finished stage leaves its model (``model`` or ``ema``)."""
    return storage.join(str(cfg.paths.root), "runs", stage, "final", which)


def resolve_init_from(cfg) -> str | None:
    """The folder ``build_model`` loads: ``train.init_from`` null → None (scratch); ``auto`` → the parent stage's
    ``final/ema``; otherwise the path itself. A missing folder or weights file is an error naming the path."""
    init_from = task_option(cfg, "init_from")
    if init_from in (None, "", "null", "none"):
        return None
    if str(init_from) == "auto":
        parent = task_option(cfg, "parent_stage")
        if not parent:
            raise ValueError("train.init_from=auto needs train.parent_stage (the stage whose final/ema to load)")
        path = final_dir(cfg, str(parent))
        hint = f"run stage={parent} first, or set train.init_from to a checkpoint folder (null = from scratch)"
    else:
        path = str(init_from)
        hint = "train.init_from must be a folder with config.json and " + DIFFUSERS_WEIGHTS
    weights = storage.join(path, DIFFUSERS_WEIGHTS)
    if not storage.is_file(weights):
        raise FileNotFoundError(f"train.init_from: no weights at {weights} ({hint})")
    return path


def local_copy(uri: str) -> str:
    """A local folder with the files of ``uri`` (itself when local; downloaded to a temp folder when remote)."""
    if not storage.is_remote(uri):
        return uri
    out = tempfile.mkdtemp(prefix="sdxl-weights-")
    for file_uri in storage.list_files(uri):
        name = file_uri.rstrip("/").rsplit("/", 1)[-1]
        with open(os.path.join(out, name), "wb") as f:
            f.write(storage.read_bytes(file_uri))
    return out


def load_module_weights(module: nn.Module, folder: str) -> nn.Module:
    """Load ``<folder>/diffusion_pytorch_model.safetensors`` into ``module`` (built from the preset): every key and
    shape must match, so a checkpoint of another preset or model kind fails naming the file."""
    weights = storage.join(folder, DIFFUSERS_WEIGHTS)
    if not storage.is_file(weights):
        raise FileNotFoundError(f"no weights file at {weights}")
    return load_into(module, os.path.join(local_copy(folder), DIFFUSERS_WEIGHTS))


def save_module_pretrained(module: nn.Module, out_dir: str) -> None:
    """``module.save_pretrained`` (safetensors) to a local folder or a URI (written locally, then uploaded)."""
    target = getattr(module, "module", module)  # tolerate a DDP wrapper
    if not storage.is_remote(out_dir):
        target.save_pretrained(out_dir, safe_serialization=True)
        return
    with tempfile.TemporaryDirectory(prefix="sdxl-save-") as tmp:
        target.save_pretrained(tmp, safe_serialization=True)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(out_dir, name), f.read())


def file_sha256(uri: str) -> str:
    digest = hashlib.sha256()
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def data_lineage(cfg) -> dict[str, str]:
    """Dataset folder, manifest content hash and (cached mode) latent cache folder."""
    dataset = dataset_dir_from_cfg(cfg)
    manifest = storage.join(dataset, MANIFEST_NAME)
    tags = {"dataset_dir": dataset,
            "manifest_sha256": file_sha256(manifest) if storage.is_file(manifest) else manifest_fingerprint(dataset)}
    if bool(cfg.loader.get("cached", False)):
        tags["latent_cache"] = latent_cache_dir(cfg)
    for key in ("filter", "top_k_by"):
        value = cfg.loader.get(key)
        if value:
            tags[f"loader_{key}"] = str(value)
    return tags


def torch_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if str(name) not in dtypes:
        raise ValueError(f"train.frozen_dtype must be one of {list(dtypes)}, got {name!r}")
    return dtypes[str(name)]
