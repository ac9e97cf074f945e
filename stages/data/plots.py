"""Data plots written next to a dataset: the image-size heatmap (SDXL Fig. 2), bucket counts and reject reasons.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend state, safe in Ray workers), saved
to memory and written with ``storage.write_bytes_atomic``, so ``out_path`` may be a local path or a URI.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from pipeline import storage
from sdxl.buckets import parse_bucket_name


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    storage.write_bytes_atomic(str(out_path), buf.getvalue())


def size_shares(orig_h: Sequence[int], orig_w: Sequence[int], threshold: int = 256) -> dict:
    """Shares of images whose height, width, either side or both sides are below ``threshold`` pixels."""
    h = np.asarray(orig_h, dtype=np.int64)
    w = np.asarray(orig_w, dtype=np.int64)
    if h.shape != w.shape or h.ndim != 1:
        raise ValueError(f"orig_h and orig_w must be 1-D and of equal length, got shapes {h.shape} and {w.shape}")
    n = int(h.size)
    if n == 0:
        return {"n": 0, "threshold": threshold, "share_h_below": 0.0, "share_w_below": 0.0,
                "share_either_below": 0.0, "share_both_below": 0.0}
    h_below, w_below = h < threshold, w < threshold
    return {"n": n, "threshold": threshold, "share_h_below": float(h_below.mean()),
            "share_w_below": float(w_below.mean()), "share_either_below": float((h_below | w_below).mean()),
            "share_both_below": float((h_below & w_below).mean())}


def plot_size_heatmap(orig_h: Sequence[int], orig_w: Sequence[int], out_path: str, threshold: int = 256) -> dict:
    """Height-vs-width 2-D histogram with a log colour scale and the ``threshold`` lines (Fig. 2); returns the shares.

    The paper reports 39% of its pre-training data below 256 px on either side; the title gives the same figure for
    this dataset.
    """
    shares = size_shares(orig_h, orig_w, threshold)
    h = np.asarray(orig_h, dtype=np.float64)
    w = np.asarray(orig_w, dtype=np.float64)
    top = max(float(h.max()) if h.size else 0.0, float(w.max()) if w.size else 0.0, threshold * 1.25)
    bins = np.linspace(0.0, top, 61)
    counts = np.histogram2d(w, h, bins=[bins, bins])[0] if h.size else np.zeros((60, 60))
    _draw_size_heatmap(counts, bins, shares, out_path, threshold)
    return shares


def plot_size_heatmap_binned(counts: np.ndarray, bin_px: int, shares: dict, out_path: str,
                             threshold: int = 256) -> dict:
    """The same figure from a pre-binned (width bins × height bins, ``bin_px`` each) count matrix: what the data
    stages accumulate part by part, so no list of every image's size is ever held."""
    counts = np.asarray(counts, dtype=np.float64)
    used = np.argwhere(counts > 0)
    top_bin = int(used.max()) + 1 if used.size else 0
    top = max(top_bin * bin_px, threshold * 1.25)
    n_bins = int(np.ceil(top / bin_px))
    padded = np.zeros((n_bins, n_bins))
    padded[:min(n_bins, counts.shape[0]), :min(n_bins, counts.shape[1])] = counts[:n_bins, :n_bins]
    group = max(1, int(np.ceil(n_bins / 60)))  # about 60 bins a side, as plot_size_heatmap draws
    n = int(np.ceil(n_bins / group))
    grouped = np.zeros((n * group, n * group))
    grouped[:n_bins, :n_bins] = padded
    grouped = grouped.reshape(n, group, n, group).sum(axis=(1, 3))
    _draw_size_heatmap(grouped, np.arange(n + 1, dtype=np.float64) * group * bin_px, shares, out_path, threshold)
    return shares


def _draw_size_heatmap(counts: np.ndarray, bins: np.ndarray, shares: dict, out_path: str, threshold: int) -> None:
    """``counts[i, j]``: images with width in bin i and height in bin j of ``bins`` (edges, px)."""
    fig = _new_figure(6.4, 5.6)
    ax = fig.add_subplot(1, 1, 1)
    top = float(bins[-1])
    if shares["n"]:
        masked = np.ma.masked_less(counts.T, 1)
        mesh = ax.pcolormesh(bins, bins, masked, norm=LogNorm(vmin=1, vmax=max(1.0, float(counts.max()))),
                             cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="images per bin (log scale)")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
    else:
        ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1.2, label=f"width = {threshold} px")
    ax.axhline(threshold, color="tab:orange", linestyle="--", linewidth=1.2, label=f"height = {threshold} px")
    ax.set_xlabel("original width (px)")
    ax.set_ylabel("original height (px)")
    ax.set_title(f"Image sizes (n={shares['n']}): {100 * shares['share_either_below']:.1f}% below {threshold} px "
                 f"on either side\n(height {100 * shares['share_h_below']:.1f}%, "
                 f"width {100 * shares['share_w_below']:.1f}%; SDXL paper: 39%)", fontsize=10)
    # Below the axes: the data can fill every corner of the plot.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, fontsize=8, frameon=False)
    ax.set_aspect("equal", adjustable="box")
    _save(fig, out_path)


def _check_counts(counts: Mapping[str, int], name: str) -> dict[str, int]:
    clean = {}
    for label, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name}: count for {label!r} is negative ({value})")
        clean[str(label)] = int(value)
    return clean


def _bar_chart(labels: list[str], values: list[int], out_path: str, *, title: str, xlabel: str, ylabel: str,
               horizontal: bool) -> None:
    n = max(len(labels), 1)
    if horizontal:
        fig = _new_figure(7.5, max(2.5, 0.35 * n + 1.2))
    else:
        fig = _new_figure(max(6.0, 0.32 * n + 1.5), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    if not labels:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    elif horizontal:
        positions = np.arange(len(labels))
        bars = ax.barh(positions, values, color="tab:red")
        ax.set_yticks(positions, labels)
        ax.invert_yaxis()  # largest first, read from the top
        ax.bar_label(bars, padding=3, fontsize=8)
        ax.margins(x=0.15)
    else:
        positions = np.arange(len(labels))
        bars = ax.bar(positions, values, color="tab:blue")
        ax.set_xticks(positions, labels, rotation=90, fontsize=8)
        if len(labels) <= 24:
            ax.bar_label(bars, padding=2, fontsize=7)
        ax.margins(y=0.12)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _save(fig, out_path)


def plot_bucket_histogram(counts: Mapping[str, int], out_path: str) -> dict:
    """Images per aspect bucket, buckets ordered by aspect ratio (height / width), labelled ``HxW``."""
    clean = _check_counts(counts, "bucket counts")
    for name in clean:
        parse_bucket_name(name)  # a clear error for a label that is not HxW
    ordered = sorted(clean, key=lambda name: (math.log(_aspect(name)), name))
    total = sum(clean.values())
    _bar_chart(ordered, [clean[name] for name in ordered], out_path,
               title=f"Images per aspect bucket ({total} images, {len(ordered)} buckets)",
               xlabel="bucket HxW (ordered by aspect ratio h/w)", ylabel="images", horizontal=False)
    return {"total": total, "num_buckets": len(ordered)}


def _aspect(name: str) -> float:
    h, w = parse_bucket_name(name)
    return h / w


def plot_reject_reasons(counts: Mapping[str, int], out_path: str) -> dict:
    """Rejected samples per reason, most frequent first."""
    clean = _check_counts(counts, "reject counts")
    ordered = sorted(clean, key=lambda reason: (-clean[reason], reason))
    total = sum(clean.values())
    _bar_chart(ordered, [clean[reason] for reason in ordered], out_path,
               title=f"Rejected samples by reason ({total} in all)", xlabel="samples", ylabel="reason",
               horizontal=True)
    return {"total": total, "num_reasons": len(ordered)}
