"""Stage `model_summary`: parameter counts of every SDXL component of a preset, beside the paper's figures.

Everything is built on the meta device, so even the full preset (≈3.5B parameters in all) costs no memory and no
weights; the counts are exact.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline.context import StageContext
from sdxl.models import build_on_meta, count_parameters
from sdxl.presets import PAPER_BASE_UNET_PARAMS, PAPER_TEXT_ENCODER_PARAMS, get_preset

logger = logging.getLogger(__name__)

# (row label, component key in build_on_meta's result, the paper's figure or None)
_ROWS = (
    ("base UNet", "unet_base", PAPER_BASE_UNET_PARAMS),
    ("refiner UNet", "unet_refiner", None),
    ("VAE", "vae", None),
    ("text encoder L (CLIP ViT-L/14)", "text_encoder_l", None),
    ("text encoder G (OpenCLIP ViT-bigG/14)", "text_encoder_g", None),
)
_PAPER_NOTE = {PAPER_BASE_UNET_PARAMS: "2,567,463,684 (public release)", PAPER_TEXT_ENCODER_PARAMS: "≈817M (Table 1)"}


def summarize(preset_name: str) -> list[dict]:
    """One row per component plus the text-encoder total: label, key, parameters, the paper's figure (or None)."""
    preset = get_preset(preset_name)
    modules = build_on_meta(preset)
    rows = [
        {"component": label, "key": key, "parameters": count_parameters(modules[key]), "paper": paper}
        for label, key, paper in _ROWS
    ]
    text_total = sum(count_parameters(modules[key]) for key in ("text_encoder_l", "text_encoder_g"))
    rows.append({"component": "text encoders total", "key": "text_encoders_total", "parameters": text_total,
                 "paper": PAPER_TEXT_ENCODER_PARAMS})
    return rows


def format_table(rows: list[dict], preset_name: str) -> str:
    width = max(len(r["component"]) for r in rows)
    lines = [f"SDXL components at preset={preset_name}", "",
             f"{'component':<{width}}  {'parameters':>15}  paper"]
    lines.append("-" * len(lines[-1]))
    for row in rows:
        paper = _PAPER_NOTE.get(row["paper"], "") if row["paper"] is not None else ""
        if preset_name != "full" and paper:
            paper += " [full preset]"
        lines.append(f"{row['component']:<{width}}  {row['parameters']:>15,}  {paper}")
    return "\n".join(lines)


def run(cfg: DictConfig, ctx: StageContext) -> dict:
    preset_name = str(cfg.model.preset)
    rows = summarize(preset_name)
    table = format_table(rows, preset_name)
    print(table)
    counts = {row["key"]: row["parameters"] for row in rows}
    ctx.log_dict({"preset": preset_name, "rows": rows}, "model_summary.json")
    ctx.log_metrics({f"params/{key}": float(value) for key, value in counts.items()})
    return {"preset": preset_name, "parameters": counts, "table": table}
