"""Stage `export`: the trained SDXL as diffusers folders and as single-file checkpoints, under ``<root>/export/``.

Sources (EMA weights by default, ``export.weights``):
- base UNet: ``export.base`` or the newest finished base stage, ``<root>/runs/<stage>/final/<weights>/`` with
  stage = finetune_quality, finetune_aspect, pretrain512, pretrain256 (first that exists);
- refiner UNet: ``runs/train_refiner/final/<weights>/`` when present (``export.refiner``);
- VAE: ``runs/train_vae/final/<weights>/`` when present, else the preset's VAE (``export.vae``);
- text encoders and tokenizers: the preset's (``model.pretrained`` on a real cluster, random at seed ``train.seed``
  otherwise — by the rule of stages/train, so the same weights the training stages conditioned on).

Outputs: ``diffusers/base/`` (StableDiffusionXLPipeline), ``diffusers/refiner/`` (StableDiffusionXLImg2ImgPipeline),
whose ``force_zeros_for_empty_prompt`` says what each model was trained with as its unconditional input (base: zeros,
true; refiner: the encoding of "", false), ``sdxl_base.safetensors`` / ``sdxl_refiner.safetensors`` (original SDXL
key layout, for ComfyUI / AUTOMATIC1111 / ``from_single_file``), ``export.json`` (what came from where) and
``README.txt``. Everything is assembled in a local
folder, then renamed into place (local root) or uploaded file by file (object store). Outputs of an earlier export
that this one does not write (say its refiner, after ``export.refiner=none``) are removed, with a warning, so the
folder never pairs models from different exports.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig

from pipeline import storage
from pipeline.context import StageContext
from sdxl.conditioner import UNCONDITIONAL_ZEROS, resolve_unconditional_kind
from sdxl.diffusers_folder import replace_folder, write_pipeline_folder
from sdxl.presets import ModelPreset, get_preset
from sdxl.single_file import save_single_file

logger = logging.getLogger(__name__)

BASE_STAGES = ("finetune_quality", "finetune_aspect", "pretrain512", "pretrain256")  # newest first
REFINER_STAGE = "train_refiner"
VAE_STAGE = "train_vae"
WEIGHTS = ("ema", "model")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_AUTO = "auto"
_NONE = ("none", "null", "")


@dataclass
class ExportSources:
    """Where each exported network comes from: a module folder URI, or None for the preset's own."""

    base: str
    base_stage: str | None
    refiner: str | None
    vae: str | None


def final_dir(root: str, stage: str, weights: str) -> str:
    """What a finished training stage leaves: ``<root>/runs/<stage>/final/<weights>/`` (diffusers module layout)."""
    return storage.join(root, "runs", stage, "final", weights)


def _is_module_dir(uri: str) -> bool:
    return storage.is_file(storage.join(uri, "config.json"))


def _is_finished(root: str, stage: str, weights: str) -> bool:
    """A stage's ``final/`` counts once its ``info.json`` (written last, the completion marker) and the chosen
    weights folder are both there."""
    final = storage.join(root, "runs", stage, "final")
    return storage.is_file(storage.join(final, "info.json")) and _is_module_dir(storage.join(final, weights))


def _explicit_module_dir(value: str, weights: str, key: str) -> str:
    """A user-given folder: a module folder itself, or a ``final/`` folder holding ``<weights>/``."""
    for candidate in (value, storage.join(value, weights)):
        if _is_module_dir(candidate):
            return candidate
    raise FileNotFoundError(f"export.{key}={value!r}: neither {storage.join(value, 'config.json')} nor "
                            f"{storage.join(value, weights, 'config.json')} exists (expected a diffusers module "
                            "folder, e.g. runs/<stage>/final/ema)")


def _optional_source(value, root: str, stage: str, weights: str, key: str) -> str | None:
    if value is None or str(value).lower() in _NONE:
        return None
    if str(value) == _AUTO:
        return final_dir(root, stage, weights) if _is_finished(root, stage, weights) else None
    return _explicit_module_dir(str(value), weights, key)


def resolve_sources(export_cfg, root: str) -> ExportSources:
    """Find the folders to export from; a missing base names every path that was looked for."""
    weights = str(export_cfg.get("weights", "ema"))
    if weights not in WEIGHTS:
        raise ValueError(f"export.weights must be one of {list(WEIGHTS)}, got {weights!r}")
    base_value = export_cfg.get("base")
    if base_value:
        base, base_stage = _explicit_module_dir(str(base_value), weights, "base"), None
    else:
        looked = [final_dir(root, stage, weights) for stage in BASE_STAGES]
        found = [(uri, stage) for uri, stage in zip(looked, BASE_STAGES) if _is_finished(root, stage, weights)]
        if not found:
            raise FileNotFoundError(
                "export needs a finished base training stage, but none of these exists: "
                + ", ".join(storage.join(p, "config.json") + " (+ ../info.json)" for p in looked)
                + ". Run a training stage first (e.g. stage=pretrain256) or set export.base=PATH.")
        base, base_stage = found[0]
    refiner = _optional_source(export_cfg.get("refiner", _AUTO), root, REFINER_STAGE, weights, "refiner")
    vae = _optional_source(export_cfg.get("vae", _AUTO), root, VAE_STAGE, weights, "vae")
    return ExportSources(base=base, base_stage=base_stage, refiner=refiner, vae=vae)


# ------------------------------------------------------------------------------------------------ loading inputs
def _stream_copy(src_fs, src_path: str, dst_fs, dst_path: str) -> None:
    dst_fs.create_dir(dst_path.rsplit("/", 1)[0], recursive=True)  # as storage.write_bytes_atomic does
    with src_fs.open_input_stream(src_path) as src, dst_fs.open_output_stream(dst_path) as dst:
        while chunk := src.read(64 << 20):
            dst.write(chunk)


def localize(uri: str, scratch: str) -> str:
    """A local path for a folder URI: itself when local, else a copy under ``scratch``."""
    if not storage.is_remote(uri):
        return storage.resolve(uri)[1]
    import pyarrow.fs as pafs

    target = os.path.join(scratch, "inputs", uri.split("://", 1)[1].replace("/", "_"))
    src_fs, _ = storage.resolve(uri)
    for file_uri in storage.list_files(uri, recursive=True):
        rel = file_uri[len(uri.rstrip("/")) + 1:]
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        _stream_copy(src_fs, storage.resolve(file_uri)[1], pafs.LocalFileSystem(), os.path.join(target, rel))
    return target


def _check_config(module, expected: dict, source: str, what: str, preset: ModelPreset) -> None:
    keys = [k for k in ("in_channels", "block_out_channels", "cross_attention_dim", "latent_channels",
                        "projection_class_embeddings_input_dim") if k in expected]
    wrong = {k: (module.config.get(k), expected[k]) for k in keys if list(_as_list(module.config.get(k)))
             != list(_as_list(expected[k]))}
    if wrong:
        raise ValueError(f"{source} does not hold the {what} of preset {preset.name!r}: "
                         + ", ".join(f"{k}={a!r} (expected {b!r})" for k, (a, b) in wrong.items()))


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def load_unet(uri: str, kind: str, preset: ModelPreset, dtype: torch.dtype, scratch: str):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(localize(uri, scratch), dtype=dtype)
    _check_config(unet, preset.unet_config(kind), uri, f"{kind} UNet", preset)
    return unet.eval()


def _train_seed(cfg) -> int:
    """The seed the training stages built untrained parts from (``train.seed``, default 0)."""
    train = cfg.get("train") or {}
    return int(train.get("seed", 0) or 0)


def _pretrained(cfg, kind: str) -> str | None:
    """The folder/hub id the training stages took frozen parts from: ``model.pretrained``, and for a refiner (which
    has no CLIP-L) ``model.pretrained_refiner`` when no base one is set — the rule of stages/train."""
    model = cfg.get("model") or {}
    source = model.get("pretrained") or (model.get("pretrained_refiner") if kind == "refiner" else None)
    return str(source) if source else None


def load_vae(uri: str | None, preset: ModelPreset, cfg, scratch: str):
    """The trained VAE at ``uri``; else the preset's: ``model.pretrained``'s ``vae/`` (or the refiner's), or the
    seeded random init the training stages used."""
    from diffusers import AutoencoderKL

    from sdxl.models import build_vae

    shared = _pretrained(cfg, "base") or _pretrained(cfg, "refiner")
    if uri is not None:
        vae = AutoencoderKL.from_pretrained(localize(uri, scratch), dtype=torch.float32)
    elif shared:
        vae = AutoencoderKL.from_pretrained(shared, subfolder="vae", dtype=torch.float32)
    else:
        vae = build_vae(preset, seed=_train_seed(cfg))
    problem = preset.vae_mismatch(dict(vae.config))  # its widths may be its own (train.vae.block_out_channels)
    if problem:
        raise ValueError(f"{uri or shared} does not hold a VAE that fits preset {preset.name!r}: it has {problem}")
    return vae.eval()


def load_text_side(preset: ModelPreset, cfg, kind: str, dtype: torch.dtype) -> dict:
    """Text encoders and tokenizers of ``kind`` exactly as the training stages built them: base CLIP-L + bigG,
    refiner bigG only; from the pretrained folder, else seeded random (what a tiny run conditioned on)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl.models import build_text_encoder_g, build_text_encoder_l
    from sdxl.tokenizers import load_tokenizers

    need_l = kind == "base"
    source = _pretrained(cfg, kind)
    tokenizer_l, tokenizer_g = load_tokenizers(source, (cfg.get("model") or {}).get("tokenizer_cache"),
                                               need_l=need_l)
    if source:
        text_l = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype) if need_l else None
        text_g = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype)
    else:
        text_l = build_text_encoder_l(preset, dtype=dtype, seed=_train_seed(cfg)) if need_l else None
        text_g = build_text_encoder_g(preset, dtype=dtype, seed=_train_seed(cfg))
    if text_g.config.hidden_size != preset.text_encoder_g["hidden_size"]:
        raise ValueError(f"{source}/text_encoder_2 has hidden_size {text_g.config.hidden_size}, preset "
                         f"{preset.name!r} expects {preset.text_encoder_g['hidden_size']}")
    return {"text_encoder_l": text_l.eval() if text_l is not None else None, "text_encoder_g": text_g.eval(),
            "tokenizer_l": tokenizer_l, "tokenizer_g": tokenizer_g, "source": source or f"preset:{preset.name}"}


# -------------------------------------------------------------------------------------------------- publishing
def publish(local_path: str, dest_uri: str) -> None:
    """Move a finished local file or folder to ``dest_uri``. Local roots: renamed into place (a folder replaces
    the old one whole). Object stores: uploaded file by file (a PUT appears only when complete), then files of an
    older export that the new folder lacks are deleted."""
    import pyarrow.fs as pafs

    dst_fs, dst_path = storage.resolve(dest_uri)
    if isinstance(dst_fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        staged = os.path.join(os.path.dirname(dst_path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(dst_path)}")
        shutil.move(local_path, staged)  # a rename when on the same filesystem
        if os.path.isdir(staged):
            replace_folder(staged, dst_path)
        else:
            os.replace(staged, dst_path)
        return
    if not os.path.isdir(local_path):
        _stream_copy(pafs.LocalFileSystem(), local_path, dst_fs, dst_path)
        return
    files = sorted(os.path.relpath(os.path.join(d, f), local_path) for d, _, fs in os.walk(local_path) for f in fs)
    for rel in files:
        _stream_copy(pafs.LocalFileSystem(), os.path.join(local_path, rel), dst_fs,
                     storage.resolve(storage.join(dest_uri, *rel.split(os.sep)))[1])
    keep = {rel.replace(os.sep, "/") for rel in files}
    for uri in storage.list_files(dest_uri, recursive=True):
        if uri[len(dest_uri.rstrip("/")) + 1:] not in keep:
            storage.remove(uri)


def readme_text(summary: dict) -> str:
    lines = [
        "SDXL export (written by `python pipeline/run.py stage=export`)",
        "",
        f"preset: {summary['preset']}    weights: {summary['weights']}    dtype: {summary['dtype']} "
        "(the VAE is always float32)",
        f"base UNet from:    {summary['sources']['base']}",
        f"refiner UNet from: {summary['sources']['refiner'] or '(none: no refiner exported)'}",
        f"VAE from:          {summary['sources']['vae'] or 'the preset VAE (model.pretrained or seeded random init)'}",
        "text encoders:     " + ", ".join(f"{k}: {v}" for k, v in summary["text_encoders"].items()),
        "unconditional:     " + ", ".join(f"{k}: {v}" for k, v in summary["unconditional"].items())
        + " (what CFG dropout trained with; force_zeros_for_empty_prompt in model_index.json)",
        "",
        "diffusers/base/     StableDiffusionXLPipeline.from_pretrained('diffusers/base')",
        "diffusers/refiner/  StableDiffusionXLImg2ImgPipeline.from_pretrained('diffusers/refiner')",
        "sdxl_base.safetensors     original SDXL layout (model.diffusion_model.*, first_stage_model.*,",
        "                          conditioner.embedders.0.transformer.* = CLIP ViT-L, conditioner.embedders.1.model.*",
        "                          = OpenCLIP bigG): for ComfyUI models/checkpoints/,",
        "                          AUTOMATIC1111 models/Stable-diffusion/",
        "sdxl_refiner.safetensors  the refiner in the same layout (conditioner.embedders.0.model.* = OpenCLIP bigG)",
        "export.json               the sources, sizes and files of this export",
        "",
        "Load a single file back as our modules: sdxl.single_file.load_single_file(path, preset_name).",
    ]
    if summary["preset"] != "full":
        lines.append(f"Note: preset {summary['preset']!r} has toy sizes; ComfyUI/AUTOMATIC1111 expect the full SDXL "
                     "sizes, so use these files with diffusers or load_single_file.")
    present = [name for name in ALL_OUTPUTS if name in summary["outputs"]]
    lines += ["", "written this time: " + ", ".join(present)]
    return "\n".join(lines) + "\n"


def _read_info(module_uri: str | None) -> dict | None:
    """``final/info.json`` beside a trained module folder, when there is one (provenance for export.json)."""
    if module_uri is None:
        return None
    info = storage.join(module_uri.rstrip("/").rsplit("/", 1)[0], "info.json")
    return storage.read_json(info) if storage.is_file(info) else None


def trained_unconditional_kind(info: dict | None, kind: str) -> str:
    """What the model was trained with as its unconditional input (``final/info.json`` records it), else the
    default of its kind: the base zeros, the refiner the encoding of "" (SPEC). The exported diffusers config's
    ``force_zeros_for_empty_prompt`` says it, so diffusers guides with the same input."""
    recorded = ((info or {}).get("lineage") or {}).get("unconditional")
    return resolve_unconditional_kind(recorded, kind, "the exported model's final/info.json")


# ------------------------------------------------------------------------------------------------------ the stage
ALL_OUTPUTS = ("diffusers/base", "diffusers/refiner", "sdxl_base.safetensors", "sdxl_refiner.safetensors")


def _remove_stale_outputs(export_dir: str, written: set[str]) -> list[str]:
    removed = []
    for name in ALL_OUTPUTS:
        uri = storage.join(export_dir, *name.split("/"))
        if name in written or not storage.exists(uri):
            continue
        storage.remove(uri)  # a file, or a folder with everything in it
        logger.warning("export: removed %s left by an earlier export (not part of this one)", uri)
        removed.append(name)
    return removed


def _staging_dir(root: str, scratch: str) -> str:
    """Local roots stage inside ``<root>/export`` (same filesystem: publishing is a rename); others in scratch."""
    base = storage.resolve(storage.join(root, "export"))[1] if not storage.is_remote(root) else scratch
    path = os.path.join(base, f".staging-{uuid.uuid4().hex}")
    os.makedirs(path)
    return path


def export_models(cfg: DictConfig, root: str, scratch: str) -> dict:
    """Everything the stage does, without Ray or MLflow: resolve, load, convert, write, publish; returns the summary
    also written to ``<root>/export/export.json``."""
    export_cfg = cfg.export
    dtype_name = str(export_cfg.get("dtype", "float32"))
    if dtype_name not in DTYPES:
        raise ValueError(f"export.dtype must be one of {list(DTYPES)}, got {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    write_diffusers, write_single = bool(export_cfg.get("diffusers", True)), bool(export_cfg.get("single_file", True))
    if not (write_diffusers or write_single):
        raise ValueError("export.diffusers and export.single_file are both false: nothing to export")
    preset = get_preset(str(cfg.model.preset))
    sources = resolve_sources(export_cfg, root)
    logger.info("export sources: %s", sources)

    vae = load_vae(sources.vae, preset, cfg, scratch)
    unets = {"base": load_unet(sources.base, "base", preset, dtype, scratch)}
    if sources.refiner is not None:
        unets["refiner"] = load_unet(sources.refiner, "refiner", preset, dtype, scratch)
    texts = {"base": load_text_side(preset, cfg, "base", dtype)}
    if "refiner" in unets:  # the same modules when both come from one source (the usual case)
        same = _pretrained(cfg, "refiner") == _pretrained(cfg, "base")
        texts["refiner"] = texts["base"] if same else load_text_side(preset, cfg, "refiner", dtype)

    infos = {"base": _read_info(sources.base), "refiner": _read_info(sources.refiner), "vae": _read_info(sources.vae)}
    unconditional = {kind: trained_unconditional_kind(infos[kind], kind) for kind in unets}
    export_dir = storage.join(root, "export")
    staging = _staging_dir(root, scratch)
    outputs: dict[str, dict] = {}
    try:
        for kind, unet in unets.items():
            text = texts[kind]
            text_l = text["text_encoder_l"] if kind == "base" else None
            tok_l = text["tokenizer_l"] if kind == "base" else None
            if write_diffusers:
                written = write_pipeline_folder(
                    os.path.join(staging, "diffusers", kind), kind, unet, vae, text["text_encoder_g"],
                    text["tokenizer_g"], text_l, tok_l,
                    force_zeros_for_empty_prompt=unconditional[kind] == UNCONDITIONAL_ZEROS)
                publish(written["path"], storage.join(export_dir, "diffusers", kind))
                outputs[f"diffusers/{kind}"] = {"files": written["files"]}
            if write_single:
                name = f"sdxl_{kind}.safetensors"
                meta = {"modelspec.title": f"SDXL {kind} ({preset.name} preset)", "sdxl_pipeline.preset": preset.name,
                        "sdxl_pipeline.unet_source": getattr(sources, kind),
                        "sdxl_pipeline.unconditional": unconditional[kind]}
                written = save_single_file(os.path.join(staging, name), kind, unet, vae, text["text_encoder_g"],
                                           text_l, metadata=meta)
                publish(written["path"], storage.join(export_dir, name))
                outputs[name] = {k: written[k] for k in ("num_tensors", "num_parameters")}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    removed = _remove_stale_outputs(export_dir, set(outputs))

    summary = {
        "export_dir": export_dir, "preset": preset.name, "weights": str(export_cfg.get("weights", "ema")),
        "dtype": dtype_name, "sources": asdict(sources), "outputs": outputs,
        "text_encoders": {kind: text["source"] for kind, text in texts.items()}, "removed_stale": removed,
        "training_info": infos, "unconditional": unconditional,
    }
    storage.write_json_atomic(storage.join(export_dir, "export.json"), summary)
    storage.write_bytes_atomic(storage.join(export_dir, "README.txt"), readme_text(summary).encode("utf-8"))
    return summary


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    summary = export_models(cfg, ctx.root, ctx.scratch_dir())
    ctx.log_dict(summary, "export.json")
    ctx.set_tags({"export.base_source": summary["sources"]["base"],
                  "export.refiner_source": str(summary["sources"]["refiner"])})
    # Full paths, so a chained workflow can check that they still exist.
    outputs = sorted(storage.join(summary["export_dir"], rel) for rel in summary["outputs"])
    return {"export_dir": summary["export_dir"], "outputs": outputs,
            "base_source": summary["sources"]["base"], "refiner_source": summary["sources"]["refiner"],
            "vae_source": summary["sources"]["vae"]}
