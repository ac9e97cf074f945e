"""Full diffusers pipeline folders for SDXL: written from our modules, read back offline.

A base folder is what ``diffusers.StableDiffusionXLPipeline.from_pretrained(folder)`` loads: ``model_index.json``,
``scheduler/`` (SDXL's Euler discrete schedule), ``text_encoder/`` + ``tokenizer/`` (CLIP ViT-L), ``text_encoder_2/``
+ ``tokenizer_2/`` (OpenCLIP bigG), ``unet/``, ``vae/``, with ``force_zeros_for_empty_prompt`` true. A refiner
folder is what ``StableDiffusionXLImg2ImgPipeline.from_pretrained`` loads: no ``text_encoder``/``tokenizer``,
``requires_aesthetics_score`` true and ``force_zeros_for_empty_prompt`` false — the public SDXL 1.0 layouts.

Folders are written to a temporary sibling and renamed into place, so a reader finds a complete folder or none.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import torch

from sdxl.sampling import make_scheduler

KINDS = ("base", "refiner")
PIPELINE_CLASSES = {"base": "StableDiffusionXLPipeline", "refiner": "StableDiffusionXLImg2ImgPipeline"}
MODEL_INDEX = "model_index.json"
SUBFOLDERS = {
    "base": ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"),
    "refiner": ("scheduler", "text_encoder_2", "tokenizer_2", "unet", "vae"),
}


def _pipeline_class(kind: str):
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return getattr(diffusers, PIPELINE_CLASSES[kind])


def make_pipeline(kind: str, unet, vae, text_encoder_g, tokenizer_g, text_encoder_l=None, tokenizer_l=None,
                  scheduler=None, force_zeros_for_empty_prompt: bool | None = None):
    """An in-memory diffusers SDXL pipeline around our modules (no copies). ``scheduler`` defaults to SDXL's
    Euler discrete scheduler on the training schedule (:func:`sdxl.sampling.make_scheduler`);
    ``force_zeros_for_empty_prompt`` (the model's unconditional input) to the kind's public setting."""
    cls = _pipeline_class(kind)
    scheduler = scheduler if scheduler is not None else make_scheduler("euler")
    zeros = (kind == "base") if force_zeros_for_empty_prompt is None else bool(force_zeros_for_empty_prompt)
    if kind == "base":
        if text_encoder_l is None or tokenizer_l is None:
            raise ValueError("a base pipeline needs text_encoder_l and tokenizer_l (CLIP ViT-L)")
        return cls(vae=vae, text_encoder=text_encoder_l, text_encoder_2=text_encoder_g, tokenizer=tokenizer_l,
                   tokenizer_2=tokenizer_g, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=zeros,
                   add_watermarker=False)
    return cls(vae=vae, text_encoder=None, text_encoder_2=text_encoder_g, tokenizer=None, tokenizer_2=tokenizer_g,
               unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=zeros,
               add_watermarker=False)


def _write_bpe_files(tokenizer, folder: str) -> None:
    """Add ``vocab.json`` + ``merges.txt`` beside ``tokenizer.json``: transformers 5 saves only the latter, while
    the slow ``CLIPTokenizer`` of transformers 4 (which ``model_index.json`` names) reads the former."""
    if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        return
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"cannot write vocab.json/merges.txt for a {type(tokenizer).__name__} into {folder}")
    backend.model.save(folder)


def replace_folder(staging: str, folder: str) -> None:
    """Move the finished ``staging`` folder to ``folder``, replacing an older one: rename the old one aside first
    so that ``folder`` is, at every moment, either absent or complete."""
    old = None
    if os.path.exists(folder):
        old = os.path.join(os.path.dirname(folder), f".old-{uuid.uuid4().hex}-{os.path.basename(folder)}")
        os.replace(folder, old)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_pipeline_folder(folder: str, kind: str, unet, vae, text_encoder_g, tokenizer_g, text_encoder_l=None,
                          tokenizer_l=None, scheduler=None, force_zeros_for_empty_prompt: bool | None = None) -> dict:
    """Write the diffusers folder of ``kind`` ("base" | "refiner") to the local path ``folder`` (safetensors weights,
    modules saved in their current dtype). Returns {"path", "kind", "files"}."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    pipeline = make_pipeline(kind, unet, vae, text_encoder_g, tokenizer_g, text_encoder_l, tokenizer_l, scheduler,
                             force_zeros_for_empty_prompt)
    staging = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(folder)}")
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipeline, name, None) is not None:
                _write_bpe_files(getattr(pipeline, name), os.path.join(staging, name))
        check_pipeline_folder(staging, kind)
        replace_folder(staging, folder)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    return {"path": folder, "kind": kind, "files": files}


def folder_kind(folder: str) -> str:
    """"base" or "refiner" from a folder's ``model_index.json`` (error names the file when it is missing)."""
    path = os.path.join(folder, MODEL_INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a diffusers pipeline folder: {path} is missing")
    with open(path, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name")
    for kind, name in PIPELINE_CLASSES.items():
        if class_name == name:
            return kind
    raise ValueError(f"{path}: _class_name {class_name!r} is not one of {sorted(PIPELINE_CLASSES.values())}")


def check_pipeline_folder(folder: str, kind: str | None = None) -> str:
    """Check that ``folder`` holds every subfolder its kind needs; returns the kind."""
    found = folder_kind(folder)
    if kind is not None and found != kind:
        raise ValueError(f"{folder} holds a {found} pipeline, expected {kind}")
    missing = [name for name in SUBFOLDERS[found] if not os.path.isdir(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(f"{folder}: subfolders {missing} are missing for an SDXL {found} pipeline")
    return found


def load_pipeline(folder: str, kind: str | None = None, dtype: torch.dtype = torch.float32):
    """The diffusers pipeline in ``folder``, loaded offline (``local_files_only``) — how users consume an export."""
    kind = check_pipeline_folder(folder, kind)
    return _pipeline_class(kind).from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                 add_watermarker=False)


def read_pipeline_folder(folder: str, kind: str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Our modules from a pipeline folder: {"unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"} plus
    "text_encoder" and "tokenizer" for a base folder."""
    pipeline = load_pipeline(folder, kind, dtype)
    return {name: module for name, module in pipeline.components.items() if module is not None}
