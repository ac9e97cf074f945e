"""Evaluation figures and tables: the Fig. 12-style FID-vs-CLIP-score curve over guidance scales, and the results
table as CSV and markdown.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state) and returned as PNG bytes, so the caller can
write them with ``storage.write_bytes_atomic`` anywhere.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fid_clip_curve_png(rows: Sequence[dict], title: str = "FID vs CLIP score over guidance scales",
                       note: str = "") -> bytes:
    """PNG of CLIP score (x) against FID (y), one point per row (keys guidance_scale, clip_score, fid), joined in
    order of guidance scale and labelled with it — the layout of SDXL Fig. 12. ``note`` goes under the title
    (e.g. that the feature networks are random)."""
    points = sorted((r for r in rows if r.get("fid") is not None and r.get("clip_score") is not None),
                    key=lambda r: r["guidance_scale"])
    if not points:
        raise ValueError("no row has both fid and clip_score to plot")
    fig = Figure(figsize=(5.5, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = [p["clip_score"] for p in points], [p["fid"] for p in points]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for p in points:
        ax.annotate(f"cfg {p['guidance_scale']:g}", (p["clip_score"], p["fid"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def table_csv(rows: Sequence[dict], columns: Sequence[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return buf.getvalue().encode("utf-8")


def table_markdown(rows: Sequence[dict], columns: Sequence[str], preamble: str = "") -> bytes:
    lines = [preamble, ""] if preamble else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")
