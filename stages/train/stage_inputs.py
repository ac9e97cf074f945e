"""What a training stage was started from, and setting aside a run made from other inputs.

Re-running a stage continues its newest checkpoint (Ray Train's auto-resume). That is right after a crash, or
after raising ``train.max_steps`` (a changed config only warns), but wrong when the stage's *inputs* changed: a
retrained parent stage, another trained VAE, other text encoders or another dataset manifest. Continuing would keep
(or keep training) weights made from the old inputs, and every later stage would build on them. So each checkpoint
and ``final/info.json`` record an ``inputs_hash``; before training, a run folder whose recorded hash differs from
the current inputs is moved aside to ``<run>.replaced-<UTC time>`` (kept, not deleted: it may hold GPU-months of
work) and the stage starts over. Runs written before the hash existed carry none and are continued as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time

from pipeline import storage
from stages.train import checkpointing
from stages.train.tasks import DIFFUSERS_WEIGHTS, data_lineage, resolve_init_from, task_option

log = logging.getLogger(__name__)

DIFFUSION_TASKS = ("base", "refiner")


def weights_identity(folder: str) -> str:
    """A stage's final weights are named by their ``final/info.json`` (which carries the training run's id, step
    and its own inputs, so a retrained parent differs even at the same path and the chain of stages is covered);
    any other folder by the hash of its weights file."""
    info = storage.join(_parent(folder), "info.json")
    source = info if storage.is_file(info) else storage.join(folder, DIFFUSERS_WEIGHTS)
    return f"{folder}@sha256:{hashlib.sha256(storage.read_bytes(source)).hexdigest()[:16]}"


def _parent(path: str) -> str:
    path = str(path).rstrip("/")
    return posixpath.dirname(path) if "://" in path else os.path.dirname(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    if "://" not in str(path):
        path, folder = os.path.abspath(path), os.path.abspath(folder)
    return str(path).rstrip("/").startswith(str(folder).rstrip("/") + "/")


def stage_inputs(cfg) -> dict[str, str]:
    """The artifacts a training stage starts from: its parent weights (``train.init_from``), and for the diffusion
    tasks the frozen VAE and text encoders and the dataset manifest. Settings are not inputs (they are the config)."""
    inputs: dict[str, str] = {}
    init = resolve_init_from(cfg)
    if init is not None:
        inputs["init"] = weights_identity(init)
    if str(task_option(cfg, "task")) in DIFFUSION_TASKS and "loader" in cfg and "model" in cfg:
        from stages.train.cache_latents import text_encoder_identity, vae_identity

        inputs["vae"] = vae_identity(cfg)
        inputs["text_encoders"] = text_encoder_identity(cfg)
    if "loader" in cfg and "data" in cfg:
        inputs["manifest_sha256"] = data_lineage(cfg)["manifest_sha256"]
    return inputs


def inputs_hash(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def recorded_hashes(run_dir: str, final_dir: str) -> dict[str, str]:
    """{file: inputs_hash} recorded by the run's newest checkpoint and its final/info.json (when they hold one)."""
    found = {}
    checkpoints = checkpointing.list_checkpoints(run_dir)
    files = [storage.join(checkpoints[0], checkpointing.META_FILE)] if checkpoints else []
    files.append(storage.join(final_dir, "info.json"))
    for path in files:
        try:
            value = storage.read_json(path).get("inputs_hash") if storage.is_file(path) else None
        except (OSError, ValueError):  # a corrupted file is the resume logic's business
            value = None
        if value:
            found[path] = str(value)
    return found


def set_aside_stale_run(run_dir: str, final_dir: str, current: str, inputs: dict[str, str]) -> str | None:
    """Move ``run_dir`` (and ``final_dir`` when it lies elsewhere) aside when they were made from other inputs;
    returns where the old run went, or None when there was nothing to move."""
    stale = {path: h for path, h in recorded_hashes(run_dir, final_dir).items() if h != current}
    if not stale:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{str(run_dir).rstrip('/')}.replaced-{stamp}"
    if storage.exists(run_dir):
        storage.move(run_dir, target)
    if not _inside(final_dir, run_dir) and storage.exists(final_dir):
        storage.move(final_dir, storage.join(target, "final"))
    log.warning("%s was made from other inputs (recorded inputs_hash %s, now %s: %s); starting the stage over. "
                "The old run is kept at %s", run_dir, ", ".join(sorted(set(stale.values()))), current,
                json.dumps(inputs, sort_keys=True), target)
    return target
