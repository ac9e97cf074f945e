"""A finished training stage's ``final/`` folder: the raw and EMA weights in diffusers layout plus ``info.json``
(stage, step, preset, config hash, lineage), published atomically and registered in MLflow.

Separate from checkpointing.py: checkpoints are per-rank training state for resuming; ``final/`` is the one model
later stages, evaluation, export and serving load.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath

from pipeline import storage

log = logging.getLogger(__name__)


def final_info(cfg, stage: str, step: int, lineage: dict, cfg_hash: str) -> dict:
    from omegaconf import OmegaConf

    preset = next((OmegaConf.select(cfg, k) for k in ("model.preset", "preset_name", "preset")
                   if isinstance(OmegaConf.select(cfg, k), str)), None)
    return {"stage": stage, "step": int(step), "preset": preset, "config_hash": cfg_hash,
            "lineage": {k: str(v) for k, v in lineage.items()}}


def is_final(final_dir: str, step: int) -> bool:
    """Whether ``final/`` already holds the export of ``step`` (its info.json is written last)."""
    info = storage.join(final_dir, "info.json")
    try:
        return storage.exists(info) and int(storage.read_json(info).get("step", -1)) == int(step)
    except (OSError, ValueError):
        return False


def export_final(task, full_state: dict, ema_state: dict, final_dir: str, info: dict, logger) -> None:
    """Rank 0: write ``final/{model,ema}`` (diffusers layout via task.save_pretrained) and ``final/info.json``.

    Built in a local scratch folder, then published atomically: on a local root a rename of the whole folder; on an
    object store file by file with info.json last (readers take info.json as the completion marker). Then logged
    as MLflow artifacts ``final/...`` and the EMA weights registered as a version of ``task.model_name``.
    """
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="final-export-")
    try:
        module = task.build_model()
        module.load_state_dict(full_state, strict=True)
        task.save_pretrained(module, os.path.join(scratch, "model"))
        module.load_state_dict({**full_state, **ema_state}, strict=True)
        task.save_pretrained(module, os.path.join(scratch, "ema"))
        del module
        with open(os.path.join(scratch, "info.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        _publish(scratch, final_dir)
        logger.log_artifacts(os.path.join(scratch, "model"), "final/model")
        logger.log_artifacts(os.path.join(scratch, "ema"), "final/ema")
        logger.log_artifact(os.path.join(scratch, "info.json"), "final")
        version = logger.register_model(task.model_name, "final/ema", tags={"stage": info["stage"],
                                                                            "step": str(info["step"])})
        if version is not None:
            log.warning("registered %s version %s from %s", task.model_name, version, final_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _publish(local_dir: str, final_dir: str) -> None:
    import shutil
    import uuid

    import pyarrow.fs as pafs

    if not storage.is_remote(final_dir) and not str(final_dir).startswith("file://"):
        parent = os.path.dirname(os.path.abspath(final_dir))
        os.makedirs(parent, exist_ok=True)
        staged = os.path.join(parent, f".tmp-final-{uuid.uuid4().hex}")
        shutil.copytree(local_dir, staged)
        old = None
        if os.path.exists(final_dir):
            old = os.path.join(parent, f".old-final-{uuid.uuid4().hex}")
            os.replace(final_dir, old)
        os.replace(staged, final_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return
    fs, path = storage.resolve(final_dir)
    local_fs = pafs.LocalFileSystem()
    for base, _, names in os.walk(local_dir):
        for name in names:
            if name == "info.json" and base == local_dir:
                continue
            rel = os.path.relpath(os.path.join(base, name), local_dir).replace(os.sep, "/")
            fs.create_dir(posixpath.dirname(posixpath.join(path, rel)), recursive=True)
            pafs.copy_files(os.path.join(base, name), posixpath.join(path, rel), source_filesystem=local_fs,
                            destination_filesystem=fs)
    with open(os.path.join(local_dir, "info.json"), "rb") as f:
        storage.write_bytes_atomic(storage.join(final_dir, "info.json"), f.read())
