"""Image-quality metrics on maintained code: FID and IS through torchmetrics (with our feature networks, see
features.py), PSNR / SSIM through torchmetrics, LPIPS through torchmetrics' network with a locally supplied trunk,
and the CLIP score (100 × cosine similarity, clamped at 0, as the paper and torchmetrics' ``CLIPScore``).

Functions here take features or images and return floats; which networks made the features is the caller's concern.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import torch
from torch import nn

from stages.evaluate.features import FeatureView

log = logging.getLogger(__name__)


def _as_2d(features, name: str) -> torch.Tensor:
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {tuple(x.shape)}")
    return x.double()


def frechet_distance(real_features, fake_features) -> float:
    """FID between two feature sets [N, D] (torchmetrics' estimator: sample means and unbiased covariances, then
    |μ1−μ2|² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½)). Needs at least 2 samples per set."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _as_2d(real_features, "real_features"), _as_2d(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    metric = FrechetInceptionDistance(feature=FeatureView(None, num_features=real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    value = float(metric.compute())
    # Round-off can leave a tiny negative distance for identical sets; a clearly negative one is left visible.
    return 0.0 if -1e-6 < value < 0 else value


def inception_score(logits, splits: int = 1, seed: int = 0) -> tuple[float, float]:
    """(mean, std over splits) of exp(E_x KL(p(y|x) ‖ p(y))) from class logits [N, K] (torchmetrics' IS).

    The split assignment uses a private generator seeded with ``seed`` so that repeated runs agree."""
    from torchmetrics.image.inception import InceptionScore

    x = _as_2d(logits, "logits")
    if splits < 1 or x.shape[0] < splits:
        raise ValueError(f"inception score needs 1 <= splits <= number of images, got splits={splits}, "
                         f"{x.shape[0]} images")
    with warnings.catch_warnings():
        # torchmetrics warns that IS buffers features (we hand it logits only) and about std() of a single split.
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=FeatureView(None, output="logits", num_features=x.shape[1]), splits=splits)
        metric.update(x)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # torchmetrics permutes with the global RNG
            mean, std = metric.compute()
    std_value = float(std) if splits > 1 else 0.0
    return float(mean), std_value


def clip_scores(image_embeddings, text_embeddings) -> torch.Tensor:
    """Per-pair CLIP score [N]: 100 · max(cos(image_i, text_i), 0)."""
    img, txt = torch.as_tensor(image_embeddings).float(), torch.as_tensor(text_embeddings).float()
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"image and text embeddings must be [N, D] of equal shape, got {tuple(img.shape)} and "
                         f"{tuple(txt.shape)}")
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return 100.0 * cos.clamp(min=0)


def clip_score(image_embeddings, text_embeddings) -> float:
    """Mean CLIP score of matching (image, text) pairs."""
    return float(clip_scores(image_embeddings, text_embeddings).mean())


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"images must be two [N, C, H, W] tensors of equal shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return a.float(), b.float()


def psnr_values(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR [N] (dB) of images in [0, 1]; identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _check_pair(reconstructions, targets)
    values = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return torch.as_tensor(values).reshape(-1).double()


def ssim_values(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM [N] (Gaussian window 11, σ 1.5) of images in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _check_pair(reconstructions, targets)
    values = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return torch.as_tensor(values).reshape(-1).double()


def psnr(reconstructions: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [0, 1]; identical images give +inf."""
    return float(psnr_values(reconstructions, targets).mean())


def ssim(reconstructions: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean SSIM of images in [0, 1]."""
    return float(ssim_values(reconstructions, targets).mean())


# ------------------------------------------------------------------------------------------------------ LPIPS
LPIPS_NETS = ("vgg", "alex")


def _trunk_key(name: str) -> str:
    """``sliceK.N.param`` in torchmetrics' LPIPS network → ``N.param`` in torchvision's ``features``."""
    return name.split(".", 1)[1]


def build_lpips(weights_path: str | None, net: str = "vgg") -> tuple[nn.Module | None, str]:
    """(torchmetrics' LPIPS network, "") with the trunk from ``weights_path``; (None, reason) when it cannot be built.

    The file is a state dict (safetensors, or a torch file loaded with ``weights_only``) of torchvision's ``vgg16()``
    / ``alexnet()`` — keys ``features.<i>.*`` (or bare ``<i>.*``); linear heads as ``lins.<k>.weight`` override the
    heads torchmetrics ships. Without a file the trunk would have to be downloaded, so LPIPS is skipped."""
    if net not in LPIPS_NETS:
        raise ValueError(f"evaluate.lpips_net must be one of {list(LPIPS_NETS)}, got {net!r}")
    if not weights_path:
        return None, "evaluate.lpips_weights not set (the LPIPS trunk is not shipped and would need a download)"
    if not os.path.isfile(str(weights_path)):
        return None, f"evaluate.lpips_weights file not found: {weights_path}"
    from sdxl.checkpoint import load_state_dict_file
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    state = load_state_dict_file(str(weights_path))
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        features = {k: v for k, v in state.items() if k.split(".", 1)[0].isdigit()}
    model = _NoTrainLpips(pretrained=True, net=net, pnet_rand=True)  # shipped linear heads, trunk filled below
    trunk = model.net.state_dict()
    missing = [k for k in trunk if _trunk_key(k) not in features]
    if missing:
        raise ValueError(f"evaluate.lpips_weights={weights_path} lacks {net} trunk weights, e.g. "
                         f"features.{_trunk_key(missing[0])} ({len(missing)} missing)")
    wrong = [k for k in trunk if tuple(features[_trunk_key(k)].shape) != tuple(trunk[k].shape)]
    if wrong:
        raise ValueError(f"evaluate.lpips_weights={weights_path} does not hold a {net} trunk: "
                         f"features.{_trunk_key(wrong[0])} has shape {tuple(features[_trunk_key(wrong[0])].shape)}")
    model.net.load_state_dict({k: features[_trunk_key(k)] for k in trunk})
    heads = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("lins.") and k.endswith(".weight")}
    for index, weight in heads.items():
        if index < len(model.lins):
            model.lins[index].model[-1].weight.data.copy_(weight.view_as(model.lins[index].model[-1].weight))
    return model.eval().requires_grad_(False), ""


@torch.no_grad()
def lpips_values(model: nn.Module, reconstructions: torch.Tensor, targets: torch.Tensor,
                 batch_size: int = 16) -> torch.Tensor:
    """Per-image LPIPS distance [N] between images in [0, 1]."""
    a, b = _check_pair(reconstructions, targets)
    device = next(model.parameters()).device
    values = [model(a[i:i + batch_size].to(device), b[i:i + batch_size].to(device), normalize=True).flatten().cpu()
              for i in range(0, a.shape[0], batch_size)]
    return torch.cat(values).double()


def lpips(model: nn.Module, reconstructions: torch.Tensor, targets: torch.Tensor, batch_size: int = 16) -> float:
    """Mean LPIPS distance between images in [0, 1]."""
    return float(lpips_values(model, reconstructions, targets, batch_size).mean())


def finite_or_none(value: float) -> float | None:
    """A value MLflow and JSON can take: None for NaN, a large finite stand-in for +inf (PSNR of equal images)."""
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return 1e9 if value > 0 else -1e9
    return float(value)
