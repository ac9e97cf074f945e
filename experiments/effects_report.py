"""Measures, statistics and output helpers of ``experiments/paper_effects.py``.

Every figure comes with its sample count, a 95% bootstrap interval (2000 resamples, seed 0) and, where an effect is
claimed, a p-value from a rank test: Spearman for a dose-response, Wilcoxon signed-rank for paired samples (same
prompt and noise), Mann-Whitney for independent sets, an exact McNemar (binomial) test for paired right/wrong answers.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

import numpy as np
import torch
from PIL import Image
from scipy import stats

from pipeline import storage
from sdxl.crops import bucket_crop_resize
from stages.evaluate.measures import high_frequency_energy, laplacian_variance, touches_border
from stages.evaluate.prompt_following import PromptSpec, lightness_auc, object_mask, read_image, score

BEGIN = "<!-- BEGIN GENERATED (experiments/paper_effects.py rewrites this part) -->"
END = "<!-- END GENERATED -->"
_BOOT = 2000


# ------------------------------------------------------------------------------------------------ statistics
def mean_ci(values, seed: int = 0) -> dict:
    """Mean of the finite values with a 95% bootstrap interval."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "ci": [None, None]}
    if v.size == 1:
        return {"n": 1, "mean": float(v[0]), "ci": [None, None]}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(_BOOT, v.size))].mean(axis=1)
    return {"n": int(v.size), "mean": float(v.mean()), "ci": [float(np.quantile(means, 0.025)),
                                                                float(np.quantile(means, 0.975))]}


def paired(a, b) -> dict:
    """b − a over pairs where both are numbers: mean difference (bootstrap CI), relative change, Wilcoxon p."""
    pairs = np.asarray([(x, y) for x, y in zip(a, b) if x is not None and y is not None
                        and math.isfinite(x) and math.isfinite(y)], dtype=np.float64).reshape(-1, 2)
    diff = pairs[:, 1] - pairs[:, 0]
    out = {**mean_ci(diff), "relative": None, "p": None}
    if len(diff) >= 3 and np.any(diff != 0):
        out["p"] = float(stats.wilcoxon(pairs[:, 1], pairs[:, 0]).pvalue)
    if len(pairs) and pairs[:, 0].mean() != 0:
        out["relative"] = float(diff.mean() / abs(pairs[:, 0].mean()))
    return out


def independent(a, b) -> dict:
    """mean(b) − mean(a) with a bootstrap CI (each set resampled on its own) and a Mann-Whitney p."""
    a = np.asarray([x for x in a if x is not None and math.isfinite(x)], dtype=np.float64)
    b = np.asarray([x for x in b if x is not None and math.isfinite(x)], dtype=np.float64)
    out = {"n": [int(a.size), int(b.size)], "difference": None, "ci": [None, None], "p": None}
    if a.size < 2 or b.size < 2:
        return out
    rng = np.random.default_rng(0)
    boot = (b[rng.integers(0, b.size, (_BOOT, b.size))].mean(1) - a[rng.integers(0, a.size, (_BOOT, a.size))].mean(1))
    out.update(difference=float(b.mean() - a.mean()), ci=[float(np.quantile(boot, 0.025)),
                                                          float(np.quantile(boot, 0.975))],
               p=float(stats.mannwhitneyu(b, a, alternative="two-sided").pvalue))
    return out


def spearman(x, y) -> dict:
    pairs = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)]
    out = {"n": len(pairs), "rho": None, "p": None}
    if len(pairs) >= 3:
        a, b = np.asarray(pairs, dtype=np.float64).T
        if a.std() > 0 and b.std() > 0:
            rho, p = stats.spearmanr(a, b)
            out.update(rho=float(rho), p=float(p))
    return out


def slope(x, y) -> dict:
    """Least-squares slope of y on x with a bootstrap CI over the pairs."""
    pairs = np.asarray([(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)], dtype=np.float64)
    if len(pairs) < 3 or pairs[:, 0].std() == 0:
        return {"n": len(pairs), "slope": None, "ci": [None, None]}
    rng = np.random.default_rng(0)
    fit = lambda p: np.polyfit(p[:, 0], p[:, 1], 1)[0]  # noqa: E731
    boots = [fit(pairs[idx]) for idx in rng.integers(0, len(pairs), (_BOOT // 4, len(pairs)))
             if pairs[idx, 0].std() > 0]
    return {"n": len(pairs), "slope": float(fit(pairs)), "ci": [float(np.quantile(boots, 0.025)),
                                                               float(np.quantile(boots, 0.975))]}


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Accuracy change b − a over paired answers, its bootstrap CI, and the exact McNemar p (discordant pairs)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    out = paired(a, b)
    only_b, only_a = int(((b == 1) & (a == 0)).sum()), int(((a == 1) & (b == 0)).sum())
    out["p"] = float(stats.binomtest(only_b, only_b + only_a).pvalue) if only_a + only_b else None
    out["discordant"] = [only_a, only_b]
    return out


# ------------------------------------------------------------------------------------------------- measures
def _array(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def position_measures(image: torch.Tensor, axis: int) -> dict:
    """Where the object is along ``axis`` (0 = x, 1 = y; centroid as a fraction of the side), how far its centroid
    is from the image centre along that axis, and whether the frame cuts it. None where no object is drawn."""
    mask = object_mask(_array(image))
    if mask is None:
        return {"found": False, "position": None, "off_centre": None, "touches_border": None}
    ys, xs = np.nonzero(mask)
    coord = (xs if axis == 0 else ys).mean() + 0.5
    position = float(coord / mask.shape[1 - axis])
    return {"found": True, "position": position, "off_centre": abs(position - 0.5),
            "touches_border": float(touches_border(mask))}


def real_crop_positions(images: list, sizes: list, offsets, resolution: int) -> list[dict]:
    """The position measure on real training images cut as experiment 1 asks the model to draw: 3:2 (or 2:3)
    originals resized to resolution × 1.5·resolution and cropped at each offset along the long side."""
    rows = []
    for image, (h, w) in zip(images, sizes):
        if not 1.4 <= max(h, w) / min(h, w) <= 1.6:
            continue
        axis = 0 if w > h else 1
        long_side = resolution * 3 // 2
        scaled = image.resize((long_side, resolution) if axis == 0 else (resolution, long_side), Image.LANCZOS)
        for offset in offsets:
            box = (offset, 0, offset + resolution, resolution) if axis == 0 else (0, offset, resolution,
                                                                                 offset + resolution)
            pixels = torch.from_numpy(np.asarray(scaled.crop(box), dtype=np.float32) / 255).permute(2, 0, 1)
            rows.append({"offset": offset, **position_measures(pixels, axis)})
    return [{"offset": o, "position": mean_ci([r["position"] for r in rows if r["offset"] == o])} for o in offsets]


def sharpness(images: torch.Tensor) -> dict:
    arrays = [_array(img) for img in images]
    return {"laplacian_variance": [laplacian_variance(a) for a in arrays],
            "hf_energy": [high_frequency_energy(a) for a in arrays]}


def real_sharpness(images: list, sizes: list, resolution: int) -> dict:
    """The training data's own sharpness at the training size (Alg. 1's centre crop), originals whose shorter side
    is below ``resolution`` (upscaled) against the rest (downscaled), with a Mann-Whitney p."""
    groups = {"small": [], "large": []}
    for image, (h, w) in zip(images, sizes):
        crop, _ = bucket_crop_resize(image, (resolution, resolution), mode="center")
        groups["small" if min(h, w) < resolution else "large"].append(laplacian_variance(np.asarray(crop)))
    return {"small": {"laplacian_variance": mean_ci(groups["small"])},
            "large": {"laplacian_variance": mean_ci(groups["large"])},
            "large_minus_small": independent(groups["small"], groups["large"])}


def following_and_sharpness(images: torch.Tensor, specs: list[PromptSpec]) -> dict:
    """Known-answer readings (prompt_following.read_image) and sharpness of images made for ``specs``."""
    readings = [read_image(_array(img)) for img in images]
    scores = score(readings, specs)
    right = {"background": [r.background == s.background for r, s in zip(readings, specs)],
             "object_color": [r.object_color == s.color for r, s in zip(readings, specs)],
             "position": [(r.row, r.col) == (s.row, s.col) for r, s in zip(readings, specs)]}
    return {"scores": {k: v for k, v in scores.items() if k.endswith(("_accuracy", "_chance", "_auc"))},
            "right": right, "readings": [(r.background, r.object_color) for r in readings],
            "lightness_auc": lightness_auc(list(zip(readings, specs))), **sharpness(images)}


# ---------------------------------------------------------------------------------------------- experiments
def crop_statistics(rows: list[dict], square_rows: list[dict], offsets) -> dict:
    per_offset = []
    for offset in offsets:
        sel = [r for r in rows if r["offset"] == offset]
        per_offset.append({"offset": offset, "expected": sel[0]["expected"],
                           "found": mean_ci([float(r["found"]) for r in sel]),
                           "position": mean_ci([r["position"] for r in sel]),
                           "touches_border": mean_ci([r["touches_border"] for r in sel])})
    x = [r["offset"] for r in rows]
    y = [r["position"] for r in rows]
    largest = [r["off_centre"] for r in rows if r["offset"] == max(offsets)]
    return {"per_offset": per_offset, "spearman": spearman(x, y), "slope": slope(x, y),
            "expected_slope": (rows[-1]["expected"] - rows[0]["expected"]) / (max(offsets) - min(offsets)),
            "square": {"found": mean_ci([float(r["found"]) for r in square_rows]),
                       "position": mean_ci([r["position"] for r in square_rows]),
                       "off_centre": mean_ci([r["off_centre"] for r in square_rows]),
                       "touches_border": mean_ci([r["touches_border"] for r in square_rows])},
            "off_centre_largest_vs_square": independent([r["off_centre"] for r in square_rows], largest)}


def size_statistics(by_side: dict, sides) -> dict:
    x = [math.log2(s) for s in sides for _ in by_side[s]["laplacian_variance"]]
    lap = [v for s in sides for v in by_side[s]["laplacian_variance"]]
    hf = [v for s in sides for v in by_side[s]["hf_energy"]]
    lo, hi = min(sides), max(sides)
    return {"per_size": [{"c_size": s, "laplacian_variance": mean_ci(by_side[s]["laplacian_variance"]),
                          "hf_energy": mean_ci(by_side[s]["hf_energy"])} for s in sides],
            "spearman_laplacian": spearman(x, lap), "spearman_hf": spearman(x, hf),
            "largest_vs_smallest": paired(by_side[lo]["laplacian_variance"], by_side[hi]["laplacian_variance"]),
            "largest_vs_smallest_hf": paired(by_side[lo]["hf_energy"], by_side[hi]["hf_energy"])}


def table2_statistics(per_model: dict, real_laplacian: float) -> dict:
    out = {}
    reference = per_model["size_cond"]
    for name, m in per_model.items():
        entry = {f"{k}_accuracy": mean_ci([float(v) for v in m["right"][k]]) for k in m["right"]}
        entry["lightness_auc"] = m["lightness_auc"]
        entry["laplacian_variance"] = mean_ci(m["laplacian_variance"])
        entry["sharpness_gap"] = mean_ci([abs(v - real_laplacian) for v in m["laplacian_variance"]])
        if name != "size_cond":
            entry["vs_size_cond"] = {
                **{f"{k}_accuracy": mcnemar(reference["right"][k], m["right"][k]) for k in m["right"]},
                "sharpness_gap": paired([abs(v - real_laplacian) for v in reference["laplacian_variance"]],
                                        [abs(v - real_laplacian) for v in m["laplacian_variance"]])}
        out[name] = entry
    return out


def refiner_statistics(base: torch.Tensor, refined: torch.Tensor, specs: list, real_laplacian: float) -> dict:
    b, r = following_and_sharpness(base, specs), following_and_sharpness(refined, specs)
    kept = [x == y for x, y in zip(b["readings"], r["readings"])]
    return {"laplacian_variance": paired(b["laplacian_variance"], r["laplacian_variance"]),
            "hf_energy": paired(b["hf_energy"], r["hf_energy"]),
            "sharpness_gap": paired([abs(v - real_laplacian) for v in b["laplacian_variance"]],
                                    [abs(v - real_laplacian) for v in r["laplacian_variance"]]),
            "readings_kept": mean_ci([float(k) for k in kept]),
            "background_accuracy": mcnemar(b["right"]["background"], r["right"]["background"]),
            "object_color_accuracy": mcnemar(b["right"]["object_color"], r["right"]["object_color"])}


def centred(specs: list[PromptSpec]) -> list[PromptSpec]:
    """The same prompts asking for the object in the centre (what the central-subject data mostly captions)."""
    return [dataclasses.replace(s, row="middle", col="center") for s in specs]


# ---------------------------------------------------------------------------------------------------- output
def save_grid(rows: list[torch.Tensor], path: str, columns: int = 12, upscale: int = 3) -> str:
    """One row per setting (the same seeds across rows), ``columns`` images each, nearest-neighbour upscaled PNG."""
    tiles = [r[:columns] for r in rows]
    h, w = tiles[0].shape[-2:]
    canvas = torch.ones(3, len(tiles) * (h + 2), columns * (w + 2))
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            canvas[:, i * (h + 2) + 1:i * (h + 2) + 1 + h, j * (w + 2) + 1:j * (w + 2) + 1 + w] = img
    array = (canvas.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array).resize((array.shape[1] * upscale, array.shape[0] * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    storage.write_bytes_atomic(path, buffer.getvalue())
    return path


def jsonable(value):
    """Plain JSON types (numpy scalars and tuples converted)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


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
