"""Measures over image sets, tables, sample grids and the results page for ``experiments/paper_effects.py``."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image
from scipy import stats

from pipeline import storage
from stages.evaluate.features import build_image_network, image_features
from stages.evaluate.measures import high_frequency_energy, laplacian_variance, object_measures
from stages.evaluate.metrics import frechet_distance

BEGIN = "<!-- BEGIN GENERATED (experiments/paper_effects.py rewrites this part) -->"
END = "<!-- END GENERATED -->"
HIST_BINS = 8


# -------------------------------------------------------------------------------------------------- measures
def mean_of(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def object_rows(images: torch.Tensor, params: list[dict]) -> list[dict]:
    """Per-image measures (stages/evaluate/measures.py) of [B, 3, H, W] images in [0, 1] against their prompts."""
    return [object_measures(img.permute(1, 2, 0).numpy(), p) for img, p in zip(images, params)]


def summarize(rows: list[dict]) -> dict:
    """Object found rate, and means over the images where the object was found (offset, cut-off) or all (HF)."""
    return {
        "object_found": mean_of([float(r["object_found"]) for r in rows]),
        "centroid_offset": mean_of([r["centroid_offset"] for r in rows]),
        "cutoff_fraction": mean_of([r["cutoff_fraction"] for r in rows]),
        "touching_border": mean_of([float(r["cutoff_fraction"] > 0) for r in rows if r["cutoff_fraction"] is not None]),
        "high_frequency_energy": mean_of([r["high_frequency_energy"] for r in rows]),
        "laplacian_variance": mean_of([r["laplacian_variance"] for r in rows]),
    }


def correlation(x, y) -> dict:
    """Pearson and Spearman correlation over pairs where y is a number; None when undefined (constant / < 3)."""
    pairs = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)]
    out = {"n": len(pairs), "pearson": None, "spearman": None, "spearman_p": None}
    if len(pairs) < 3:
        return out
    a, b = np.array(pairs, dtype=np.float64).T
    if a.std() == 0 or b.std() == 0:
        return out
    rho, p = stats.spearmanr(a, b)
    out.update(pearson=float(np.corrcoef(a, b)[0, 1]), spearman=float(rho), spearman_p=float(p))
    return out


def hf_energies(images: torch.Tensor) -> list[float]:
    return [high_frequency_energy(img.permute(1, 2, 0).numpy()) for img in images]


def laplacians(images: torch.Tensor) -> list[float]:
    return [laplacian_variance(img.permute(1, 2, 0).numpy()) for img in images]


def colour_histogram(images: torch.Tensor) -> np.ndarray:
    """Normalised joint RGB histogram (8 bins per channel) of a whole image set."""
    q = (images.clamp(0, 1) * (HIST_BINS - 1e-6)).long()
    idx = (q[:, 0] * HIST_BINS + q[:, 1]) * HIST_BINS + q[:, 2]
    hist = torch.bincount(idx.flatten(), minlength=HIST_BINS ** 3).double()
    return (hist / hist.sum()).numpy()


def colour_histogram_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total-variation distance (0 = same colour distribution, 1 = disjoint) between two image sets' histograms."""
    return float(0.5 * np.abs(colour_histogram(a) - colour_histogram(b)).sum())


class FidEvaluator:
    """FID on the project's ``random_small`` feature network: random weights, so the figure checks plumbing and
    gross distribution shifts only; it does not rank image quality the way Inception-FID does."""

    def __init__(self, real: torch.Tensor, seed: int = 0):
        self.net, self.label = build_image_network("random_small", seed=seed)
        self.real = real
        self.real_features = image_features(self.net, real)["pool"]
        self.real_hf = float(np.mean(hf_energies(real)))

    def evaluate(self, fake: torch.Tensor) -> dict:
        hf = float(np.mean(hf_energies(fake)))
        return {
            "fid_random_features": frechet_distance(self.real_features, image_features(self.net, fake)["pool"]),
            "colour_hist_distance": colour_histogram_distance(fake, self.real),
            "hf_energy": hf,
            "hf_energy_gap": abs(hf - self.real_hf),
        }


# ---------------------------------------------------------------------------------------------------- output
def save_grid(rows: list[torch.Tensor], path: str, columns: int = 8, upscale: int = 2) -> str:
    """One row per setting (the same seeds across rows), ``columns`` images each, nearest-neighbour upscaled PNG."""
    tiles = [r[:columns] for r in rows]
    h, w = tiles[0].shape[-2:]
    canvas = torch.ones(3, len(tiles) * (h + 2), columns * (w + 2))
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            canvas[:, i * (h + 2) + 1:i * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = img
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array).resize((array.shape[1] * upscale, array.shape[0] * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    storage.write_bytes_atomic(path, buffer.getvalue())
    return path


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results_page(path: str, generated: str) -> None:
    """Replace the generated block of ``path`` (text outside the markers — the commentary — is kept)."""
    block = f"{BEGIN}\n{generated.rstrip()}\n{END}\n"
    old = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            old = handle.read()
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    elif old:
        text = old.rstrip("\n") + "\n\n" + block  # a hand-written page without a block: the block goes last
    else:
        text = "# Paper effects at toy scale\n\n" + block
    storage.write_bytes_atomic(path, text.encode("utf-8"))
