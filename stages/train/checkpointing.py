"""Training checkpoints: what goes in, how each rank writes its share, and how a run finds a good one to resume.

A checkpoint directory (``checkpoint_<step:09d>``, one per reported step, in Ray Train's run folder) holds:

- the strategy's model+optimizer state (``model.safetensors``/``optimizer.pt`` for DDP, ``dcp/`` for FSDP,
  ``deepspeed/`` for ZeRO) — see strategies.py;
- the EMA: ``ema.safetensors`` when replicated, ``ema_rank<r>.safetensors`` under ZeRO-3, inside ``dcp/`` for FSDP;
- ``trainer_state.pt`` (rank 0): step, lr-scheduler position, EMA update count;
- ``rng_rank<r>.pt``: torch / CUDA / numpy / python RNG states and the loss generator of rank r;
- ``meta.json`` (rank 0): step, strategy, world size, the model signature (parameter name → shape), config hash;
- ``files_rank<r>.json``: the files rank r wrote and their sizes, written last, so a reader can tell a complete,
  intact checkpoint from a truncated or overwritten one without reading every byte.

Every rank writes only its own files into its own local folder; Ray Train merges the folders into the stored
checkpoint. Everything we load ourselves goes through safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import re

import numpy as np
import torch
import torch.distributed as dist

from pipeline import storage

log = logging.getLogger(__name__)

META_FILE = "meta.json"
TRAINER_STATE_FILE = "trainer_state.pt"
EMA_FILE = "ema.safetensors"
_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model or layout; resuming from it would be wrong."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or unreadable."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:09d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def ema_shard_file(rank: int) -> str:
    return f"ema_rank{rank:05d}.safetensors"


def files_manifest(rank: int) -> str:
    return f"files_rank{rank:05d}.json"


def model_signature(module: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter/buffer name → shape of the unwrapped model: what a checkpoint must match to be loadable."""
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def signature_hash(signature: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


# --- RNG ----------------------------------------------------------------------------------------------------------
def capture_rng(generator: torch.Generator) -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": random.getstate(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save ---------------------------------------------------------------------------------------------------------
def _ema_layout(strategy) -> str:
    if strategy.name == "fsdp":
        return "dcp"
    return "per_rank" if strategy.shards_params else "replicated"


def save_checkpoint(directory: str, *, step: int, strategy, model, optimizer, scheduler, ema, generator,
                    meta: dict) -> None:
    """Write this rank's files for ``step`` into ``directory`` (a local folder of this rank). Collective."""
    from safetensors.torch import save_file

    rank = _rank()
    os.makedirs(directory, exist_ok=True)
    layout = _ema_layout(strategy)
    strategy.save(model, optimizer, directory, extra_sharded={"ema": ema.shadow} if layout == "dcp" else None)
    ema_cpu = {k: v.detach().cpu().contiguous() for k, v in ema.shadow.items()}
    if layout == "per_rank":
        save_file(ema_cpu, os.path.join(directory, ema_shard_file(rank)))
    torch.save(capture_rng(generator), os.path.join(directory, rng_file(rank)))
    if rank == 0:
        if layout == "replicated":
            save_file(ema_cpu, os.path.join(directory, EMA_FILE))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        torch.save({"step": step, "scheduler": sched, "ema_num_updates": ema.num_updates},
                   os.path.join(directory, TRAINER_STATE_FILE))
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump({**meta, "step": step, "strategy": strategy.name, "ema_layout": layout}, f, indent=2)
    # Last: the list of what this rank wrote, with sizes (the rank's completion marker).
    files = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, directory)
            if not rel.startswith("files_rank"):  # every file in this folder is this rank's own
                files[rel] = os.path.getsize(path)
    with open(os.path.join(directory, files_manifest(rank)), "w") as f:
        json.dump(files, f, indent=1, sort_keys=True)


# --- find and verify ----------------------------------------------------------------------------------------------
def step_of(path: str) -> int | None:
    m = _CKPT_RE.match(posixpath.basename(str(path).rstrip("/")))
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str) -> list[str]:
    """``checkpoint_*`` folders directly under ``run_dir`` (local path or URI), newest (highest step) first."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(run_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    found = [(step_of(i.path), posixpath.basename(i.path)) for i in infos if i.type == pafs.FileType.Directory]
    return [storage.join(run_dir, name) for s, name in sorted((f for f in found if f[0] is not None), reverse=True)]


def candidates(latest: str | None, resume_from: str | None) -> list[str]:
    """Checkpoints to try in order: the latest one, then older siblings (for a corrupted latest).

    ``latest`` is Ray Train's checkpoint (auto-resume); otherwise ``resume_from`` is a checkpoint folder or a run
    folder holding ``checkpoint_*`` folders.
    """
    start = latest or resume_from
    if not start:
        return []
    start = str(start).rstrip("/")
    if latest is None and step_of(start) is None:
        found = list_checkpoints(start)
        if not found:
            raise FileNotFoundError(f"train.resume_from={start}: no checkpoint_* folders there")
        return found
    parent = posixpath.dirname(start) if storage.is_remote(start) else os.path.dirname(start)
    current = step_of(start)
    older = [p for p in list_checkpoints(parent) if (step_of(p) or 0) < (current or 0)]
    return [start] + older


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable ({e})") from e


def check_compatible(directory: str, meta: dict, *, signature: dict, strategy, world_size: int) -> None:
    """Raise CheckpointMismatchError, naming the meta file, when the checkpoint cannot belong to this run."""
    path = os.path.join(directory, META_FILE)
    saved = meta.get("signature", {})
    if signature_hash(saved) != signature_hash(signature):
        missing = sorted(set(signature) - set(saved))[:3]
        extra = sorted(set(saved) - set(signature))[:3]
        shape = [f"{k}: checkpoint {saved[k]} vs model {signature[k]}" for k in sorted(set(saved) & set(signature))
                 if saved[k] != signature[k]][:3]
        raise CheckpointMismatchError(
            f"{path} was written for a different model config (model {meta.get('model_name')!r}); "
            f"missing in checkpoint: {missing}, unexpected: {extra}, shape differences: {shape}")
    if meta.get("strategy") != strategy.name:
        raise CheckpointMismatchError(f"{path} was written with train.strategy={meta.get('strategy')!r}, "
                                      f"this run uses {strategy.name!r}")
    resizable = strategy.name in ("ddp", "fsdp")
    if not resizable and int(meta.get("world_size", world_size)) != world_size:
        raise CheckpointMismatchError(f"{path} was written by {meta.get('world_size')} workers; strategy "
                                      f"{strategy.name} needs the same number, this run has {world_size}")


def verify_files(directory: str, meta: dict) -> None:
    """Every rank's manifest exists and every listed file has its recorded size."""
    for rank in range(int(meta["world_size"])):
        manifest = os.path.join(directory, files_manifest(rank))
        try:
            with open(manifest) as f:
                files = json.load(f)
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{manifest}: missing or unreadable ({e})") from e
        for rel, size in files.items():
            path = os.path.join(directory, rel)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise CorruptCheckpointError(f"{path}: missing or not {size} bytes")


# --- load ---------------------------------------------------------------------------------------------------------
def load_state(directory: str, meta: dict, *, strategy, model, optimizer, scheduler, ema, generator) -> int:
    """Load everything from a verified checkpoint folder; returns its step."""
    from safetensors.torch import load_file

    rank = _rank()
    layout = meta["ema_layout"]
    strategy.load(model, optimizer, directory, extra_sharded={"ema": ema.shadow} if layout == "dcp" else None)
    if layout != "dcp":
        name = ema_shard_file(rank) if layout == "per_rank" else EMA_FILE
        shadow = load_file(os.path.join(directory, name))
        ema.load_state_dict({"shadow": shadow, "num_updates": 0})
    state = torch.load(os.path.join(directory, TRAINER_STATE_FILE), map_location="cpu", weights_only=True)
    ema.num_updates = int(state["ema_num_updates"])
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    # The lr follows *this* run's schedule (max_steps may have grown since the checkpoint was written).
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    rng_path = os.path.join(directory, rng_file(rank))
    if os.path.exists(rng_path):  # a run on more workers than the checkpoint's has no saved RNG for new ranks
        restore_rng(torch.load(rng_path, map_location="cpu", weights_only=True), generator)
    return int(state["step"])


def _all_ok(ok: bool) -> bool:
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def config_change_warning(meta: dict, path: str, stage: str | None, cfg_hash: str | None) -> str | None:
    """The warning for resuming this stage's own checkpoint written under another config (a re-run with changed
    settings continues the old run's step, optimizer and schedule); None when nothing changed or it is another
    stage's checkpoint (a parent-stage start via ``train.resume_from``)."""
    saved = meta.get("config_hash")
    if cfg_hash is None or saved is None or saved == cfg_hash or meta.get("stage") != stage:
        return None
    return (f"resuming {stage} from {path}, written with another config (hash {saved}, now {cfg_hash}): it continues "
            f"that run's step {meta.get('step')}, optimizer and learning-rate schedule. To start over, delete "
            f"{posixpath.dirname(path.rstrip('/'))} or use another paths.root")


def resume(paths: list[str], *, signature: dict, strategy, model, optimizer, scheduler, ema, generator,
           world_size: int, stage: str | None = None, cfg_hash: str | None = None) -> tuple[int, str | None]:
    """Load the first good checkpoint of ``paths``; (step, path) — (0, None) when there is none to load.

    A corrupted checkpoint is skipped with a warning (every rank must agree it loaded); a mismatched one raises.
    With ``stage`` and ``cfg_hash``, resuming the stage's own checkpoint of another config logs a warning (rank 0).
    """
    from ray.train import Checkpoint

    tried = []
    for path in paths:
        fs, fs_path = storage.resolve(path)
        with Checkpoint(fs_path, filesystem=fs).as_directory() as local:
            error = None
            try:
                meta = read_meta(local)
                check_compatible(local, meta, signature=signature, strategy=strategy, world_size=world_size)
                verify_files(local, meta)
            except CorruptCheckpointError as e:
                error = e
            if error is None:
                try:
                    step = load_state(local, meta, strategy=strategy, model=model, optimizer=optimizer,
                                      scheduler=scheduler, ema=ema, generator=generator)
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # unreadable content: try the previous checkpoint
                    error = e
            if _all_ok(error is None):
                warning = config_change_warning(meta, path, stage, cfg_hash)
                if warning and _rank() == 0:
                    log.warning(warning)
                return step, path
        tried.append(f"{path}: {error or 'unreadable on another rank'}")
        log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path,
                    error or "another rank could not read it")
    if tried:
        raise CorruptCheckpointError("no usable checkpoint to resume from:\n  " + "\n  ".join(tried))
    return 0, None


def config_hash(cfg_container: dict) -> str:
    return hashlib.sha256(json.dumps(cfg_container, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The settings that change what a run's steps compute (its recipe): not where anything lives (a moved root, another
# storage path), how often it logs, samples or checkpoints, or how its data is fed. The model section counts whole.
RECIPE_KEYS = {
    "train": ("strategy", "zero_stage", "mixed_precision", "lr", "min_lr", "warmup_steps", "schedule", "betas",
              "weight_decay", "eps", "grad_clip", "snr_gamma", "ema_decay", "ema_warmup", "global_batch_size", "seed",
              "task", "ucg_rate", "ucg_joint", "offset_noise", "t_range", "size_conditioning", "frozen_dtype"),
    "loader": ("resolution", "multi_aspect", "bucket_multiple", "synthetic_caption_prob", "filter", "top_k_by",
               "crop_mode", "seed", "cached", "latent_downsample"),
}


def recipe_hash(cfg_container: dict) -> str:
    """The hash of :data:`RECIPE_KEYS` and the model section: two runs with the same recipe hash train alike."""
    recipe = {section: {key: (cfg_container.get(section) or {}).get(key) for key in keys}
              for section, keys in RECIPE_KEYS.items()}
    recipe["model"] = cfg_container.get("model")
    train = cfg_container.get("train") or {}
    own_options = train.get(str(train.get("task")))  # the task's own section (train.vae: the autoencoder's loss)
    if own_options is not None:  # absent for the diffusion tasks, whose hashes stay as they were
        recipe["task_options"] = own_options
    return config_hash(recipe)
