"""The autoencoder's perceptual term: LPIPS with a VGG16 trunk (Zhang et al. 2018), as in the LDM autoencoder loss.

``train.vae.lpips_weights``:
- ``auto`` — torchvision's VGG16 ImageNet weights from the torch hub cache (``<torch.hub.get_dir()>/checkpoints/
  vgg16-397923af.pth``, where ``torchvision.models.vgg16(weights="IMAGENET1K_V1")`` downloads them) plus the LPIPS
  linear heads torchmetrics ships in its package (``torchmetrics/functional/image/lpips_models/vgg.pth``). Where a
  file is missing the term is off, with one warning naming the file and how to provide it: nothing is downloaded.
- a path — one state-dict file (safetensors, or a torch file loaded ``weights_only``) with ``features.*`` (as
  torchvision's ``vgg16().features``) and ``lins.<0-4>.weight``;
- null — off.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from sdxl.checkpoint import load_into, load_state_dict_file

log = logging.getLogger(__name__)

LPIPS_AUTO = "auto"
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1


class PerceptualLoss(nn.Module):
    """LPIPS (VGG16 variant): channel-normalised VGG features at relu1_2..relu5_3, squared differences weighted by
    the learned linear heads, averaged over space, summed over layers. Weights come from files (build_perceptual)."""

    _CUTS = (4, 9, 16, 23, 30)
    _CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # VGG16's convolutional trunk only (the same module indices as torchvision's vgg16().features).
        self.features = make_layers(cfgs["D"])[: self._CUTS[-1]]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self._CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps, start = [], 0
        for cut in self._CUTS:
            x = self.features[start:cut](x)
            taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            start = cut
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B] between images in [-1, 1]."""
        return sum(lin((fa - fb) ** 2).mean(dim=(1, 2, 3)) for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)))


def lpips_auto_sources() -> tuple[str, str]:
    """(VGG16 trunk file in the torch hub cache, LPIPS heads file shipped with torchmetrics) that ``auto`` reads."""
    import torchmetrics.functional.image.lpips as tm_lpips

    trunk = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    heads = os.path.join(os.path.dirname(tm_lpips.__file__), "lpips_models", "vgg.pth")
    return trunk, heads


def _from_auto_sources(trunk_path: str, heads_path: str) -> PerceptualLoss:
    net = PerceptualLoss()
    trunk, heads = load_state_dict_file(trunk_path), load_state_dict_file(heads_path)
    state = {k: v for k, v in trunk.items() if k.startswith("features.") and k in net.state_dict()}
    # torchmetrics names head k "lin<k>.model.1.weight" (dropout, then the 1x1 convolution)
    state.update({f"lins.{k}.weight": heads.get(f"lin{k}.model.1.weight") for k in range(len(net.lins))})
    missing = sorted(k for k in net.state_dict() if state.get(k) is None)
    if missing:
        raise ValueError(f"train.vae.lpips_weights=auto: {trunk_path} / {heads_path} lack {missing[:3]} "
                         f"({len(missing)} missing): not torchvision's VGG16 and torchmetrics' LPIPS heads")
    net.load_state_dict(state, strict=True)
    return net


def build_perceptual(setting) -> tuple[PerceptualLoss | None, str]:
    """(the LPIPS module or None, what it was built from — or why it is off) for ``train.vae.lpips_weights``."""
    if not setting:
        return None, "off"
    if str(setting) == LPIPS_AUTO:
        trunk, heads = lpips_auto_sources()
        missing = [path for path in (trunk, heads) if not os.path.isfile(path)]
        if missing:
            log.warning("train.vae.lpips_weights=auto: the perceptual (LPIPS) term is OFF because %s is missing. "
                        "Provide it (on a machine with network access: python -c \"import torchvision; "
                        "torchvision.models.vgg16(weights='IMAGENET1K_V1')\", then copy the file there) or set "
                        "train.vae.lpips_weights to a weights file; train.vae.lpips_weights=null silences this.",
                        " and ".join(missing))
            return None, f"off (missing {', '.join(missing)})"
        return _from_auto_sources(trunk, heads), f"auto ({trunk} + {heads})"
    # names the file when keys or shapes do not fit
    return load_into(PerceptualLoss(), str(setting)), str(setting)
