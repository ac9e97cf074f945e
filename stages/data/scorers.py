"""Model-based image scores for the filter stage: CLIP image–text similarity, the LAION aesthetic score, and optional
watermark / NSFW probabilities, all from one CLIP image embedding per image.

Weights: open_clip loads the CLIP model by tag or checkpoint file (``scoring.pretrained``; real clusters use ViT-L-14 /
openai, the model LAION's aesthetic predictor was trained on). Heads load from safetensors or a torch state dict read
with ``weights_only=True``. Random weights are only allowed with ``random_init_ok`` (tests, demos); otherwise a
missing weight is an error naming the config key.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``: no arbitrary pickles)."""
    if not os.path.isfile(str(path)):
        raise FileNotFoundError(f"{what}: weight file not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} does not hold a state dict (got {type(state).__name__})")
    return state


def register_open_clip_config(arch: str, model_config: Any) -> None:
    """Make a custom architecture (a dict, or a .json file) known to open_clip under the name ``arch``."""
    if model_config is None:
        return
    import open_clip.factory as factory

    if isinstance(model_config, (str, os.PathLike)):
        with open(model_config, encoding="utf-8") as f:
            model_config = json.load(f)
    if not isinstance(model_config, dict):  # an OmegaConf node: open_clip needs plain containers
        from omegaconf import OmegaConf

        model_config = OmegaConf.to_container(model_config, resolve=True)
    config = dict(model_config)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(f"model_config for {arch!r} lacks {missing}")
    # open_clip has no public call to register a config from memory; its registry is this module-level dict.
    factory._MODEL_CONFIGS[arch] = config


def build_open_clip(section: Any, what: str):
    """(model in eval mode, image preprocess, tokenizer) for an open_clip config section (arch, pretrained, ...)."""
    import open_clip

    arch = str(section.get("arch"))
    pretrained = section.get("pretrained")
    register_open_clip_config(arch, section.get("model_config"))
    if not pretrained:
        if not section.get("random_init_ok", False):
            raise ValueError(f"{what}.pretrained is not set (an open_clip tag such as 'openai' or a checkpoint file); "
                             f"set {what}.random_init_ok=true to run with random weights")
    elif _looks_like_path(str(pretrained)) and not os.path.isfile(str(pretrained)):
        raise FileNotFoundError(f"{what}.pretrained: checkpoint file not found: {pretrained}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(section.get("seed", 0)))
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        if not pretrained:
            # CoCa's multimodal decoder makes its output projection with torch.empty and never initialises it
            # (its own init_parameters is broken): give it seeded values, as open_clip's init would.
            for module in model.modules():
                projection = getattr(module, "text_projection", None)
                if type(module).__name__ == "MultimodalTransformer" and isinstance(projection, nn.Parameter):
                    with torch.no_grad():
                        nn.init.normal_(projection, std=int(module.width) ** -0.5)
    tokenizer = open_clip.get_tokenizer(arch)
    return model.eval(), preprocess, tokenizer


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


class AestheticMLP(nn.Module):
    """The LAION "improved aesthetic predictor" head; parameter names match its released state dict (``layers.N``)."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


def _load_head(module: nn.Module, path: str | None, key: str, random_ok: bool) -> nn.Module:
    if path:
        state = load_state_dict(path, key)
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{key}: {path} does not fit the expected head layout: {err}") from err
    elif not random_ok:
        raise ValueError(f"{key} is not set; set scoring.random_init_ok=true to use a random head")
    return module.eval()


class ImageTextScorer:
    """Scores (image, caption) pairs; every score comes from one normalized CLIP image embedding per image."""

    def __init__(self, model: nn.Module, preprocess, tokenizer, aesthetic: nn.Module,
                 heads: dict[str, nn.Module] | None = None, device: torch.device | str = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"scoring.batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.aesthetic = aesthetic.to(self.device).eval()
        self.heads = {name: head.to(self.device).eval() for name, head in (heads or {}).items()}
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, section: Any) -> "ImageTextScorer | None":
        """The scorer of a ``scoring`` config section; None when ``scoring.enabled`` is false."""
        if section is None or not section.get("enabled", True):
            return None
        random_ok = bool(section.get("random_init_ok", False))
        model, preprocess, tokenizer = build_open_clip(section, "scoring")
        dim = _embed_dim(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(section.get("seed", 0)) + 1)
            aesthetic = _load_head(AestheticMLP(dim), section.get("aesthetic_weights"), "scoring.aesthetic_weights",
                                   random_ok)
            heads = {}
            for name in ("watermark", "nsfw"):
                path = section.get(f"{name}_weights")
                if path:
                    heads[f"{name}_prob"] = _load_head(nn.Linear(dim, 1), path, f"scoring.{name}_weights", random_ok)
        return cls(model, preprocess, tokenizer, aesthetic, heads, resolve_device(section.get("device")),
                   int(section.get("batch_size", 32)))

    @torch.no_grad()
    def score(self, images: list, captions: list[str]) -> dict[str, np.ndarray]:
        """float32 arrays of length len(images): clip_score (cosine × 100, floored at 0 as in CLIPScore),
        aesthetic_score, and watermark_prob / nsfw_prob when their heads are configured."""
        if len(images) != len(captions):
            raise ValueError(f"score() got {len(images)} images but {len(captions)} captions")
        parts: dict[str, list[np.ndarray]] = {"clip_score": [], "aesthetic_score": []}
        parts.update({name: [] for name in self.heads})
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = torch.stack([self.preprocess(image) for image in batch]).to(self.device)
            tokens = self.tokenizer([str(c) for c in captions[start:start + self.batch_size]]).to(self.device)
            image_emb = nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            text_emb = nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
            parts["clip_score"].append((100.0 * (image_emb * text_emb).sum(-1)).clamp(min=0).cpu().numpy())
            parts["aesthetic_score"].append(self.aesthetic(image_emb).cpu().numpy())
            for name, head in self.heads.items():
                parts[name].append(torch.sigmoid(head(image_emb).squeeze(-1)).cpu().numpy())
        return {name: (np.concatenate(chunks) if chunks else np.zeros(0)).astype(np.float32)
                for name, chunks in parts.items()}


def _embed_dim(model: nn.Module) -> int:
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return int(projection.shape[-1])
    if isinstance(projection, nn.Linear):
        return int(projection.out_features)
    raise ValueError(f"cannot read the CLIP embedding dimension of {type(model).__name__}")


def from_config(section: Any) -> ImageTextScorer | None:
    return ImageTextScorer.from_config(section)
