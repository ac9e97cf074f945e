"""Where the served weights come from, and loading each component inside the replica that needs it.

A weights *source* is one of:
- ``None`` — the preset's random initialisation from ``serve.seed`` (the same seed gives the same weights in every
  replica, and the same frozen text encoders a training run with that model seed used);
- a folder (relative paths are under ``paths.root``; ``s3://``-style URIs are copied to a local cache first):
  a training stage's ``final/`` (its ``ema/`` is served), a ``save_pretrained`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), or a diffusers SDXL pipeline folder (``unet/ vae/ text_encoder*/
  tokenizer*/``);
- ``models:/<name>/<version>`` (or ``models:/<name>@<alias>``) — an MLflow registered model version, downloaded from
  ``mlflow.tracking_uri``; its artifact folder is treated like a folder above.

Only safetensors are read (``use_safetensors=True``): never pickled weights. Each replica resolves its own sources,
so replicas on other nodes download what they need themselves.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass

import torch

from pipeline import storage

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config entries that decide whether a checkpoint fits the preset's architecture.
_UNET_KEYS = ("in_channels", "block_out_channels", "cross_attention_dim", "projection_class_embeddings_input_dim")


@dataclass(frozen=True)
class ModelSources:
    """What a replica needs to build its models: the preset, the random-init seed, and one source per component.

    ``text`` is a diffusers SDXL folder for the text encoders and tokenizers (None: random encoders + the built-in CLIP
    vocabulary). ``base``, ``refiner`` and ``vae`` are sources as described in the module docstring.
    """

    preset: str = "tiny"
    seed: int = 0
    root: str = "."
    tracking_uri: str | None = None
    text: str | None = None
    base: str | None = None
    refiner: str | None = None
    vae: str | None = None
    device: str = "auto"
    dtype: str = "float32"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in _DTYPES:
            raise ValueError(f"serve.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        # Half precision only pays off on an accelerator; on CPU it is slow and poorly supported.
        return _DTYPES[self.dtype] if self.torch_device().type == "cuda" else torch.float32

    def latent_downsample(self) -> int:
        """The VAE's pixels per latent: the preset's (load_vae refuses a VAE that does not fit the preset)."""
        from sdxl.presets import get_preset

        return get_preset(self.preset).vae_downsample


def sources_from_config(cfg, tracking_uri: str | None = None) -> ModelSources:
    """ModelSources from ``cfg.serve`` (+ ``cfg.paths.root``). ``serve.model_uri`` and friends take precedence over
    ``serve.checkpoint`` and friends; a diffusers SDXL folder given as ``serve.checkpoint`` also supplies the text
    encoders unless ``serve.text_encoders`` names another folder."""
    s = cfg.serve
    base = s.get("model_uri") or s.get("checkpoint")
    text = s.get("text_encoders")
    vae = s.get("vae_model_uri") or s.get("vae_checkpoint")
    if s.get("checkpoint") and not s.get("model_uri"):
        candidate = _local_path(str(s.checkpoint), str(cfg.paths.root))
        if candidate and _is_pipeline_folder(candidate):
            # A whole diffusers SDXL folder also supplies what the others leave open.
            text = text or str(s.checkpoint)
            vae = vae or str(s.checkpoint)
    return ModelSources(
        preset=str(s.get("preset") or "tiny"),
        seed=int(s.get("seed") or 0),
        root=str(cfg.paths.root),
        tracking_uri=tracking_uri,
        text=text,
        base=base,
        refiner=s.get("refiner_model_uri") or s.get("refiner_checkpoint"),
        vae=vae,
        device=str(s.get("device") or "auto"),
        dtype=str(s.get("dtype") or "float32"),
    )


# ---- resolving a source to a local folder -----------------------------------------------------------------------


def _local_path(source: str, root: str) -> str | None:
    """The local folder a plain path names (relative → under root); None for URIs that need fetching."""
    if source.startswith("models:/") or storage.is_remote(source):
        return None
    if source.startswith("file://"):
        return source[len("file://"):]
    if os.path.isabs(source):
        return source
    if storage.is_remote(root):
        return None
    return os.path.join(root, source)


def _is_pipeline_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "model_index.json")) or os.path.isdir(os.path.join(folder, "unet"))


def _fresh_dir(prefix: str) -> str:
    # A fresh folder per load: a registered version or an object-store folder may be replaced under the same name,
    # so nothing is reused from an earlier download.
    return tempfile.mkdtemp(prefix=f"sdxl-serve-{prefix}-")


def _model_version_source(uri: str, tracking_uri: str) -> str:
    """The artifact URI a ``models:/<name>/<version|latest>`` or ``models:/<name>@<alias>`` URI points at.

    Resolved with an explicit client: mlflow's own ``models:/`` handling consults the process-wide registry URI,
    not the tracking URI we were given.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    ref = uri[len("models:/"):].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    elif "/" in ref:
        name, version = ref.split("/", 1)
        if version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise FileNotFoundError(f"registered model {name!r} has no versions ({uri})")
            version = str(max(int(v.version) for v in versions))
    else:
        raise ValueError(f"model URI must be models:/<name>/<version>, models:/<name>/latest or "
                         f"models:/<name>@<alias>, got {uri!r}")
    return client.get_model_version_download_uri(name, version)


def _download_registered_model(uri: str, tracking_uri: str | None) -> str:
    import mlflow.artifacts

    if not tracking_uri:
        raise ValueError(f"{uri} is an MLflow model URI but no mlflow.tracking_uri is known to resolve it")
    source = _model_version_source(uri, tracking_uri)
    log.info("%s resolves to %s", uri, source)
    if not source.startswith(("models:/", "runs:/", "mlflow-artifacts:/")) and _local_path(source, "/") \
            and os.path.isdir(_local_path(source, "/")):
        return _local_path(source, "/")  # a local artifact store: read in place
    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=_fresh_dir("mlflow"),
                                               tracking_uri=tracking_uri)


def _copy_remote_folder(uri: str) -> str:
    """Copy every file under a remote folder to a local folder (from_pretrained reads local files)."""
    files = storage.list_files(uri, recursive=True)
    if not files:
        raise FileNotFoundError(f"no files under weights folder {uri}")
    dst = _fresh_dir("copy")
    prefix = uri.rstrip("/") + "/"
    for file_uri in files:
        storage.write_bytes_atomic(os.path.join(dst, file_uri[len(prefix):]), storage.read_bytes(file_uri))
    return dst


def resolve_folder(source: str, root: str, tracking_uri: str | None) -> str:
    """A local folder holding the weights ``source`` names (downloading or copying when needed)."""
    if source.startswith("models:/"):
        folder = _download_registered_model(source, tracking_uri)
    elif storage.is_remote(source):
        folder = _copy_remote_folder(source)
    elif storage.is_remote(root) and not os.path.isabs(source):
        folder = _copy_remote_folder(storage.join(root, source))
    else:
        folder = _local_path(source, root)
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"weights folder not found: {source!r} (looked at {folder!r})")
    return folder


def component_folder(folder: str, subfolder: str) -> tuple[str, str | None]:
    """(folder, subfolder for from_pretrained) of one component inside what a source resolved to.

    A stage's ``final/`` → its ``ema/`` weights (``model/`` when no EMA was kept); a pipeline folder → its
    ``<subfolder>/``; a ``save_pretrained`` folder → itself.
    """
    for candidate in ("ema", "model"):
        if os.path.isfile(os.path.join(folder, candidate, "config.json")):
            return os.path.join(folder, candidate), None
    if os.path.isfile(os.path.join(folder, subfolder, "config.json")):
        return folder, subfolder
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder, None
    raise FileNotFoundError(
        f"{folder} holds no weights: expected ema/config.json (a stage's final/), {subfolder}/config.json "
        "(a diffusers SDXL folder) or config.json (a save_pretrained folder)"
    )


def _check_fits(source: str, what: str, config: dict, expected: dict, keys: tuple[str, ...], preset: str) -> None:
    for key in keys:
        have, want = config.get(key), expected.get(key)
        if isinstance(have, tuple):
            have = list(have)
        if have != want:
            raise ValueError(f"{what} weights in {source} have {key}={have!r} but serve.preset={preset!r} expects "
                             f"{want!r}: set serve.preset to the size the checkpoint was trained at")


# ---- loading components -----------------------------------------------------------------------------------------


def load_unet(sources: ModelSources, kind: str):
    """The base (``kind="base"``) or refiner UNet on the serving device, in eval mode."""
    from diffusers import UNet2DConditionModel

    from sdxl.models import build_unet
    from sdxl.presets import get_preset

    preset = get_preset(sources.preset)
    source = sources.base if kind == "base" else sources.refiner
    device, dtype = sources.torch_device(), sources.torch_dtype()
    if source is None:
        unet = build_unet(preset, kind, dtype=dtype, seed=sources.seed)
    else:
        folder, sub = component_folder(resolve_folder(str(source), sources.root, sources.tracking_uri), "unet")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder=sub, torch_dtype=dtype, use_safetensors=True)
        _check_fits(str(source), f"{kind} UNet", dict(unet.config), preset.unet_config(kind), _UNET_KEYS,
                    sources.preset)
        log.info("loaded %s UNet from %s", kind, source)
    return unet.to(device).eval().requires_grad_(False)


def load_vae(sources: ModelSources):
    """The autoencoder on the serving device (float32: SDXL's VAE overflows in float16)."""
    from diffusers import AutoencoderKL

    from sdxl.models import build_vae, place_module
    from sdxl.presets import get_preset

    preset = get_preset(sources.preset)
    source = sources.vae
    if source is None:
        vae = build_vae(preset, seed=sources.seed)
    else:
        folder, sub = component_folder(resolve_folder(str(source), sources.root, sources.tracking_uri), "vae")
        vae = AutoencoderKL.from_pretrained(folder, subfolder=sub, torch_dtype=torch.float32, use_safetensors=True)
        problem = preset.vae_mismatch(dict(vae.config))  # its widths may be its own (train.vae.block_out_channels)
        if problem:
            raise ValueError(f"VAE weights in {source} have {problem} but serve.preset={sources.preset!r} does not: "
                             "set serve.preset to the size the checkpoint was trained at")
        log.info("loaded VAE from %s", source)
    return place_module(vae, sources.torch_device(), torch.float32).eval().requires_grad_(False)


def load_text_conditioners(sources: ModelSources):
    """(base TextConditioner, refiner TextConditioner) sharing one bigG encoder, on the serving device."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdxl.conditioner import UNCONDITIONAL_ZEROS, TextConditioner
    from sdxl.models import build_text_encoder_g, build_text_encoder_l
    from sdxl.presets import get_preset
    from sdxl.tokenizers import load_tokenizers

    preset = get_preset(sources.preset)
    device, dtype = sources.torch_device(), sources.torch_dtype()
    if sources.text is None:
        text_l = build_text_encoder_l(preset, dtype=dtype, seed=sources.seed)
        text_g = build_text_encoder_g(preset, dtype=dtype, seed=sources.seed)
        tok_l, tok_g = load_tokenizers(None)
    else:
        folder = resolve_folder(str(sources.text), sources.root, sources.tracking_uri)
        text_l = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, use_safetensors=True)
        text_g = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", dtype=dtype,
                                                             use_safetensors=True)
        for model, expected, name in ((text_l, preset.text_encoder_l, "text_encoder"),
                                      (text_g, preset.text_encoder_g, "text_encoder_2")):
            _check_fits(str(sources.text), name, model.config.to_dict(), expected, ("hidden_size", "projection_dim"),
                        sources.preset)
        tok_l, tok_g = load_tokenizers(folder)
        log.info("loaded text encoders and tokenizers from %s", sources.text)
    for encoder in (text_l, text_g):
        encoder.to(device).eval().requires_grad_(False)
    zeros = {kind: recorded_unconditional_kind(_local_folder(source, sources), kind) == UNCONDITIONAL_ZEROS
             for kind, source in (("base", sources.base), ("refiner", sources.refiner))}
    base = TextConditioner(tok_l, text_l, tok_g, text_g, kind="base", force_zeros_for_empty_prompt=zeros["base"])
    refiner = TextConditioner(None, None, tok_g, text_g, kind="refiner",
                              force_zeros_for_empty_prompt=zeros["refiner"])
    return base, refiner


def _local_folder(source: str | None, sources: ModelSources) -> str | None:
    """The local folder of a weights source without fetching anything (None for URIs and random weights)."""
    if source is None:
        return None
    folder = _local_path(str(source), sources.root)
    return folder if folder and os.path.isdir(folder) else None


def recorded_unconditional_kind(folder: str | None, kind: str) -> str:
    """The unconditional input (``"zeros"`` | ``"empty_prompt"``) the weights in ``folder`` were trained with: a
    training stage's ``final/info.json`` (``lineage.unconditional``; the folder or its parent, for ``final/ema``),
    a diffusers pipeline's ``model_index.json`` (``force_zeros_for_empty_prompt``), else the default of ``kind``
    (what this project trains; also what a fetched ``models:/`` or object-store source gets)."""
    from sdxl.conditioner import UNCONDITIONAL_EMPTY_PROMPT, UNCONDITIONAL_ZEROS, resolve_unconditional_kind

    recorded, where = None, "default"
    for info_path in _candidates(folder, "info.json", with_parent=True):
        with open(info_path, encoding="utf-8") as f:
            recorded, where = (json.load(f).get("lineage") or {}).get("unconditional"), info_path
        break
    if recorded is None:
        for index_path in _candidates(folder, "model_index.json"):
            with open(index_path, encoding="utf-8") as f:
                force_zeros = json.load(f).get("force_zeros_for_empty_prompt")
            if force_zeros is not None:
                recorded = UNCONDITIONAL_ZEROS if force_zeros else UNCONDITIONAL_EMPTY_PROMPT
    return resolve_unconditional_kind(recorded, kind, where)


def _candidates(folder: str | None, name: str, with_parent: bool = False) -> list[str]:
    if folder is None:
        return []
    folder = folder.rstrip("/\\") or folder
    paths = [os.path.join(folder, name)] + ([os.path.join(os.path.dirname(folder), name)] if with_parent else [])
    return [p for p in paths if os.path.isfile(p)]
