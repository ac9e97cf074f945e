"""What a training stage was started from, and setting aside a run made from other inputs.

Re-running a stage continues its newest checkpoint (Ray Train's auto-resume). That is right after a crash, or
after raising ``train.max_steps`` (a changed config only warns), but wrong when the stage's *inputs* changed: a
retrained parent stage, another trained VAE, other text encoders or another dataset manifest. Continuing would keep
(or keep training) weights made from the old inputs, and every later stage would build on them. So each checkpoint
and ``final/info.json`` record an ``inputs_hash``; before training, a run folder whose recorded hash differs from
the current inputs is moved aside to ``<run>.replaced-<UTC time>`` (kept, not deleted: it may hold GPU-months of
work) and the stage starts over. A run written before the hash existed carries none: it is set aside only when its
parent's weights were written after it, and otherwise continued as before.

A changed config only warns, so that raising ``train.max_steps`` continues a run. But a run that already reached the
new ``max_steps`` under another recipe (``checkpointing.recipe_hash``: learning rate, batch, timesteps, model, ...;
not paths or logging) would train no step at all and hand back the old recipe's weights as this one's result (a chain
step re-run after its learning rate changed, say); such a run is set aside the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time

from omegaconf import OmegaConf

from pipeline import storage
from stages.train import checkpointing
from stages.train.tasks import DIFFUSERS_WEIGHTS, data_lineage, resolve_init_from, task_option

log = logging.getLogger(__name__)

DIFFUSION_TASKS = ("base", "refiner")


def _identity_file(folder: str) -> str:
    """What names a weights folder: a stage's ``final/info.json`` beside it, else its weights file."""
    info = storage.join(_parent(folder), "info.json")
    return info if storage.is_file(info) else storage.join(folder, DIFFUSERS_WEIGHTS)


def weights_identity(folder: str) -> str:
    """A stage's final weights are named by their ``final/info.json`` (which carries the training run's id, step
    and its own inputs, so a retrained parent differs even at the same path and the chain of stages is covered);
    any other folder by the hash of its weights file."""
    return f"{folder}@sha256:{hashlib.sha256(storage.read_bytes(_identity_file(folder))).hexdigest()[:16]}"


def _parent(path: str) -> str:
    path = str(path).rstrip("/")
    return posixpath.dirname(path) if storage.is_remote(path) else os.path.dirname(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    if not storage.is_remote(path):
        path, folder = os.path.abspath(path), os.path.abspath(folder)
    return str(path).rstrip("/").startswith(str(folder).rstrip("/") + "/")


def stage_inputs(cfg, init: str | None = None) -> dict[str, str]:
    """The artifacts a training stage starts from: its parent weights (``init``, by default resolved from
    ``train.init_from``), and for the diffusion tasks the frozen VAE and text encoders and the dataset manifest.
    Settings are not inputs (they are the config)."""
    inputs: dict[str, str] = {}
    init = init if init is not None else resolve_init_from(cfg)
    if init is not None:
        inputs["init"] = weights_identity(init)
    if str(task_option(cfg, "task")) in DIFFUSION_TASKS and "loader" in cfg and "model" in cfg:
        from stages.train.cache_latents import text_encoder_identity, vae_identity

        inputs["vae"] = vae_identity(cfg)
        inputs["text_encoders"] = text_encoder_identity(cfg)
    if "loader" in cfg and "data" in cfg:
        inputs["manifest_sha256"] = data_lineage(cfg)["manifest_sha256"]
    return inputs


def prepare_run(cfg, run_dir: str, final_dir: str) -> str:
    """The stage's inputs_hash, after setting aside a run in ``run_dir`` / ``final_dir`` made from other inputs, or
    one finished under another recipe that continuing would not train."""
    parent = resolve_init_from(cfg)
    inputs = stage_inputs(cfg, parent)
    current = inputs_hash(inputs)
    if set_aside_stale_run(run_dir, final_dir, current, inputs, parent) is None:
        # The hash the training loop records in each checkpoint (stages.train.loop), from the same container.
        recipe = checkpointing.recipe_hash(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
        set_aside_finished_run(run_dir, final_dir, recipe, int(cfg.train.max_steps))
    return current


def inputs_hash(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _records(run_dir: str, final_dir: str) -> list[str]:
    """The files that say what a run was made from: its newest checkpoint's meta.json and its final/info.json."""
    checkpoints = checkpointing.list_checkpoints(run_dir)
    files = [storage.join(checkpoints[0], checkpointing.META_FILE)] if checkpoints else []
    files.append(storage.join(final_dir, "info.json"))
    return [path for path in files if storage.is_file(path)]


def recorded_hashes(records: list[str]) -> dict[str, str]:
    """{file: inputs_hash} of the record files that hold one."""
    found = {}
    for path in records:
        try:
            value = storage.read_json(path).get("inputs_hash")
        except (OSError, ValueError):  # a corrupted file is the resume logic's business
            value = None
        if value:
            found[path] = str(value)
    return found


def _mtime(uri: str) -> float:
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def _older_than_parent(records: list[str], parent: str | None) -> bool:
    """A run recorded before inputs_hash existed is stale when its parent's weights were written after it."""
    if not records or not parent:
        return False
    return _mtime(_identity_file(parent)) > max(_mtime(path) for path in records)


def set_aside_stale_run(run_dir: str, final_dir: str, current: str, inputs: dict[str, str],
                        parent: str | None = None) -> str | None:
    """Move ``run_dir`` (and ``final_dir`` when it lies elsewhere) aside when they were made from other inputs
    (another recorded inputs_hash; with none recorded, a ``parent`` folder written after them); returns where the
    old run went, or None when there was nothing to move."""
    records = _records(run_dir, final_dir)
    recorded = recorded_hashes(records)
    stale = sorted({h for h in recorded.values() if h != current})
    if recorded and not stale:
        return None
    if not recorded:
        if not _older_than_parent(records, parent):
            return None
        stale = [f"none recorded, and {parent} is newer than the run"]
    target = _move_aside(run_dir, final_dir)
    log.warning("%s was made from other inputs (recorded inputs_hash %s; now %s: %s); starting the stage over. "
                "The old run is kept at %s", run_dir, ", ".join(stale), current, json.dumps(inputs, sort_keys=True),
                target)
    return target


def set_aside_finished_run(run_dir: str, final_dir: str, recipe: str, max_steps: int) -> str | None:
    """Move the run aside when its newest checkpoint was written under another recipe hash at a step the current
    ``max_steps`` does not exceed (resuming it would train nothing); returns where it went, or None. A checkpoint
    without a recipe hash (written before it was recorded) is continued, as before."""
    checkpoints = checkpointing.list_checkpoints(run_dir)
    if not checkpoints:
        return None
    try:
        meta = storage.read_json(storage.join(checkpoints[0], checkpointing.META_FILE))
    except (OSError, ValueError):  # a corrupted checkpoint is the resume logic's business
        return None
    saved, step = meta.get("recipe_hash"), meta.get("step")
    if saved is None or saved == recipe or step is None or int(step) < max_steps:
        return None
    target = _move_aside(run_dir, final_dir)
    log.warning("%s finished at step %s under another recipe (hash %s, now %s); with train.max_steps=%d, resuming "
                "it would train no step and keep its weights, so the stage starts over. The old run is kept at %s",
                run_dir, step, saved, recipe, max_steps, target)
    return target


def _move_aside(run_dir: str, final_dir: str) -> str:
    """Move ``run_dir`` (and ``final_dir`` when it lies elsewhere) to ``<run_dir>.replaced-<UTC time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{str(run_dir).rstrip('/')}.replaced-{stamp}"
    if storage.exists(run_dir):
        storage.move(run_dir, target)
    if not _inside(final_dir, run_dir) and storage.exists(final_dir):
        storage.move(final_dir, storage.join(target, "final"))
    return target
