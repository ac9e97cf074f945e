"""Feature networks behind the evaluation metrics: an Inception-style image network (FID pool features, IS logits)
and an open_clip model (CLIP score).

What a config selects (``evaluate.fid_weights``):
- ``torch_fidelity`` — torch-fidelity's ``FeatureExtractorInceptionV3``, the standard FID network (TF-Inception
  ``pt_inception-2015-12-05``, downloaded once into the torch hub cache); a path to that network's weights file loads
  it locally instead. This is what published FID / IS numbers use.
- ``random_inception`` — torchvision's ``inception_v3`` architecture with fixed-seed random weights;
- ``random_small`` — a small conv net with fixed-seed random weights (fast on a CPU).

Figures from the two ``random_*`` networks (and from ``evaluate.clip_model=tiny``, a small open_clip model with random
weights) exercise the plumbing only: they rank nothing and must not be read as image quality. The evaluation summary
says so in ``feature_weights`` / ``clip_weights``. No installed package ships Inception or CLIP image weights (the only
weight files in site-packages are torchmetrics' LPIPS linear heads and its DISTS weights), so offline runs use these.

Every network takes uint8 images [N, 3, H, W] (any size; each resizes as it needs). :class:`FeatureView` exposes one
output in the form torchmetrics' ``FrechetInceptionDistance(feature=...)`` / ``InceptionScore(feature=...)`` expect,
and passes a 2-D tensor through unchanged, so features computed once can feed several metrics (and tests can feed
known vectors).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

RANDOM_NOTE = "random (plumbing only)"
FID_CHOICES = ("torch_fidelity", "random_inception", "random_small")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def _seeded(seed: int):
    """Random init from a private seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] floats in [0, 1] (or uint8 as they are) → uint8."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [N, 3, H, W] tensor, got {getattr(images, 'shape', type(images))}")


class SmallConvNet(nn.Module):
    """Four strided conv layers at 64 px: pool features (``feature_dim``) and logits (``num_classes``)."""

    def __init__(self, feature_dim: int = 64, num_classes: int = 16, size: int = 64):
        super().__init__()
        self.size = size
        widths = (3, 16, 32, 64, feature_dim)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_classes)
        # He-normal init keeps the activation scale through the layers, so random features still vary between
        # images (PyTorch's default init shrinks them layer by layer towards a constant).
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self.dims = {"pool": feature_dim, "logits": num_classes}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 127.5 - 1.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        pool = self.trunk(x).mean(dim=(2, 3))
        return {"pool": pool, "logits": self.head(pool)}


class TorchvisionInception(nn.Module):
    """torchvision ``inception_v3`` at 299 px: 2048-dim pool features and 1000 logits."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=True)
        self.head = net.fc
        net.fc = nn.Identity()
        self.trunk = net
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.dims = {"pool": 2048, "logits": 1000}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", antialias=True, align_corners=False)
        pool = self.trunk((x - self.mean) / self.std)
        return {"pool": pool, "logits": self.head(pool)}


class FidelityInception(nn.Module):
    """torch-fidelity's FID Inception (``pool`` = the 2048-dim features, ``logits`` = the 1008 unbiased logits)."""

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights_path)
        self.dims = {"pool": 2048, "logits": 1008}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images)
        return {"pool": pool, "logits": logits}


def build_image_network(fid_weights: str = "random_small", seed: int = 0) -> tuple[nn.Module, str]:
    """(network in eval mode, description of its weights) for ``evaluate.fid_weights``; see the module doc."""
    choice = str(fid_weights)
    if choice == "random_small":
        with _seeded(seed):
            net = SmallConvNet()
        label = RANDOM_NOTE
    elif choice == "random_inception":
        with _seeded(seed):
            net = TorchvisionInception()
        label = RANDOM_NOTE
    elif choice == "torch_fidelity":
        net, label = FidelityInception(), "pt_inception-2015-12-05 (torch-fidelity)"
    elif os.path.isfile(choice):
        net, label = FidelityInception(choice), f"pt_inception-2015-12-05 from {choice}"
    else:
        raise ValueError(f"evaluate.fid_weights must be one of {list(FID_CHOICES)} or an existing weights file, "
                         f"got {choice!r}")
    return net.eval().requires_grad_(False), label


class FeatureView(nn.Module):
    """One output (``pool`` or ``logits``) of an image network, as torchmetrics' metrics call a custom feature module:
    images [N, 3, H, W] → [N, D]. A 2-D tensor is taken as features already and returned unchanged. ``net`` None
    makes a pure pass-through of width ``num_features``. ``num_features`` saves torchmetrics its probe forward."""

    def __init__(self, net: nn.Module | None, output: str = "pool", num_features: int | None = None):
        super().__init__()
        if net is None and num_features is None:
            raise ValueError("FeatureView without a network needs num_features")
        if output not in ("pool", "logits"):
            raise ValueError(f"output must be 'pool' or 'logits', got {output!r}")
        self.net = net
        self.output = output
        self.num_features = int(num_features if num_features is not None else net.dims[output])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            if x.shape[1] != self.num_features:
                raise ValueError(f"features must have {self.num_features} columns, got {tuple(x.shape)}")
            return x
        if self.net is None:
            raise ValueError("this FeatureView only passes [N, D] features through; got images")
        _check_images(x)
        with torch.no_grad():
            return self.net(to_uint8(x))[self.output]


@torch.no_grad()
def image_features(net: nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``{"pool": [N, D] float64, "logits": [N, K] float64}`` of images (float in [0, 1] or uint8), on the CPU."""
    _check_images(images)
    device = next(net.parameters()).device
    outs: dict[str, list[torch.Tensor]] = {"pool": [], "logits": []}
    for start in range(0, images.shape[0], batch_size):
        batch = to_uint8(images[start:start + batch_size]).to(device)
        result = net(batch)
        for name in outs:
            outs[name].append(result[name].double().cpu())
    return {name: torch.cat(parts) if parts else torch.zeros(0, net.dims[name], dtype=torch.float64)
            for name, parts in outs.items()}


# ------------------------------------------------------------------------------------------------ CLIP (open_clip)
def _tiny_clip() -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(embed_dim=32,
                vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


class ClipEmbedder(nn.Module):
    """An open_clip model and its tokenizer: unit-norm image and text embeddings for the CLIP score.

    ``model_name="tiny"``: a 2-layer open_clip model (ViT 32 px, width 32) with fixed-seed random weights and the
    CLIP BPE tokenizer (shipped with open_clip) — plumbing only. Otherwise ``open_clip.create_model(model_name,
    pretrained=pretrained)``; the paper scores with ``ViT-g-14`` (``laion2b_s34b_b88k``); ``pretrained`` may be a
    local checkpoint file.
    """

    def __init__(self, model_name: str = "tiny", pretrained: str | None = None, seed: int = 0):
        super().__init__()
        import open_clip

        if model_name == "tiny":
            with _seeded(seed):
                self.model = _tiny_clip()
            self.tokenizer = open_clip.get_tokenizer("ViT-g-14")
            self.weights = RANDOM_NOTE
        else:
            self.model = open_clip.create_model(model_name, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(model_name)
            self.weights = f"{model_name}/{pretrained}" if pretrained else f"{model_name} ({RANDOM_NOTE})"
        self.model.eval().requires_grad_(False)
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        mean = getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to the model's size (bicubic), center-crop, normalise — open_clip's transform."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        h, w = x.shape[-2:]
        th, tw = self.image_size
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        _check_images(images)
        out = [self.model.encode_image(self._preprocess(images[i:i + batch_size].to(self.device)))
               for i in range(0, images.shape[0], batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        out = [self.model.encode_text(self.tokenizer(list(texts[i:i + batch_size])).to(self.device))
               for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1).cpu()
