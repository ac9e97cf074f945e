"""The generated block of docs/results.md: tables, command, seeds, wall times, grids and a mechanical verdict per
experiment (the sign and size of the measured effect; the human reading lives outside the block)."""

from __future__ import annotations

import os

from experiments.effects_report import fmt, table


def _rel(path: str, out_dir: str) -> str:
    return os.path.relpath(path, out_dir).replace(os.sep, "/")


def _corr(c: dict) -> str:
    return (f"Spearman ρ = {fmt(c['spearman'])} (p = {fmt(c['spearman_p'], 4)}), Pearson r = {fmt(c['pearson'])}, "
            f"n = {c['n']}")


def _verdict(rho, expected_sign: int, what: str) -> str:
    if rho is None:
        return f"**Verdict:** undefined ({what}: too few measurable images)."
    agrees = rho * expected_sign > 0
    strength = "clear" if abs(rho) >= 0.3 else ("weak" if abs(rho) >= 0.1 else "negligible")
    return (f"**Verdict:** {what} — {strength} correlation in the "
            f"{'paper' if agrees else 'opposite'}'s direction (ρ = {rho:.3f}).")


def _header(r: dict) -> list[str]:
    cfg, clock = r["config"], r["wall_seconds"]
    training = "; ".join(f"{k}: {v['steps']} steps, {v['seconds']:.0f} s, pool {v['pool']}, seen {v['seen']}"
                         for k, v in r["training"].items())
    return [
        f"Command: `{r['command']}` — wall time {clock['total']:.0f} s ({clock['training']:.0f} s training), "
        f"on {r['machine']}.",
        "",
        f"Seeds: training data = demo generator seed {cfg['data_seed']} ({cfg['n_train']} images), held-out prompts "
        f"and real reference = seed {cfg['heldout_seed']} ({cfg['n_heldout']} images), model / batch order / crops / "
        f"noise / CFG dropout = seed {cfg['model_seed']}; sample i of every setting starts from noise seed i, and the "
        "ancestral step noise comes from seed 0 (the same at a batch position in every setting). "
        f"Sampling: DDIM with eta = 1 (ancestral), {cfg['sample_steps']} steps, guidance scale {cfg['guidance_scale']}.",
        "",
        f"Training (batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, EMA weights sampled): {training}.",
        "",
    ]


def _crop_section(r: dict, out_dir: str) -> list[str]:
    c = r["crop"]
    rows = [[x["c_crop"], x["object_found"], x["centroid_offset"], x["cutoff_fraction"], x["touching_border"]]
            for x in c["rows"]]
    data = [[x["c_crop"], x["n"], x["object_found"], x["centroid_offset"], x["cutoff_fraction"],
             x["touching_border"]] for x in c["data_rows"]]
    headers = ["c_crop (px, one axis)", "object found", "centroid offset", "cut-off fraction", "touches border"]
    return [
        "## 1. Crop conditioning (Sec. 2.2, Fig. 5)",
        "",
        f"Base model A. Even seeds: c_size = {tuple(r['config']['crop_original_size'])} with c_crop = (0, x); odd "
        f"seeds: c_size = {tuple(r['config']['crop_original_size'][::-1])} with c_crop = (x, 0) — a 3:1 original "
        "resized to 32×96, for which Alg. 1 produces every offset in the table. Offset / cut-off are means over "
        "images whose object (segmented by the prompted colour) was found.",
        "",
        table(headers, rows),
        "",
        f"c_crop vs centroid offset: {_corr(c['corr_offset'])}.  ",
        f"c_crop vs cut-off fraction: {_corr(c['corr_cutoff'])}.",
        "",
        _verdict(c["corr_cutoff"]["spearman"], +1, "larger c_crop → more cut-off objects"),
        "",
        "What the training data itself shows (real Alg. 1 crops of 500 training images at that offset):",
        "",
        table(["c_crop", "crops", "object found", "centroid offset", "cut-off fraction", "touches border"], data),
        "",
        f"![crop conditioning grid]({_rel(c['grid'], out_dir)}) — rows: c_crop = "
        f"{', '.join(str(m) for m in r['config']['crop_magnitudes'])}; columns: seeds 0–7.",
        "",
    ]


def _size_section(r: dict, out_dir: str) -> list[str]:
    s = r["size"]
    rows = [[x["c_size"], x["hf_energy"], x["hf_energy_std"], x["laplacian_variance"]] for x in s["rows"]]
    real = [[x["set"], x["n"], x["hf_energy"], x["laplacian_variance"]] for x in s["real_rows"]]
    return [
        "## 2. Size conditioning (Sec. 2.2, Fig. 3)",
        "",
        "Base model A, c_crop = (0, 0), the same prompts and seeds in every row.",
        "",
        table(["c_size (square)", "HF energy (mean)", "HF energy (std)", "Laplacian variance"], rows),
        "",
        f"log2(c_size) vs HF energy: {_corr(s['corr_log2_size_hf'])}.  ",
        f"log2(c_size) vs Laplacian variance: {_corr(s['corr_log2_size_laplacian'])}.",
        "",
        _verdict(s["corr_log2_size_hf"]["spearman"], +1, "larger c_size → more high-frequency energy"),
        "",
        _verdict(s["corr_log2_size_laplacian"]["spearman"], +1, "larger c_size → higher Laplacian variance"),
        "",
        "Real reference (Alg. 1 centre crops of held-out images):",
        "",
        table(["set", "images", "HF energy", "Laplacian variance"], real),
        "",
        f"![size conditioning grid]({_rel(s['grid'], out_dir)}) — rows: c_size = "
        f"{', '.join(str(v) for v in r['config']['size_values'])}; columns: seeds 0–7.",
        "",
    ]


def _table2_section(r: dict, out_dir: str) -> list[str]:
    t = r["table2"]
    rows = [[x["model"], x["train_pool"], x["images_seen"], x["sampled_c_size"], x["fid_random_features"],
             x["colour_hist_distance"], x["hf_energy"], x["hf_energy_gap"], x["object_found"]] for x in t["rows"]]
    best = min(t["rows"], key=lambda x: x["hf_energy_gap"])["model"]
    return [
        "## 3. Table 2 analogue (equal steps)",
        "",
        f"Each model after {r['config']['table_steps']} steps of batch {r['config']['batch_size']}; "
        f"{r['config']['n_fid']} samples each against {t['real_n']} held-out real images with originals ≥ 32 px "
        f"(real HF energy {fmt(t['real_hf_energy'])}). FID uses the project's `{t['feature_net']}` feature network: "
        "it is plumbing, not a quality ranking. Colour-histogram distance (total variation over an 8³ RGB "
        "histogram), HF-energy gap to real and the prompted-colour hit rate are the proxies to read.",
        "",
        table(["model", "training pool", "distinct images seen", "sampled c_size", "FID (random feats)",
               "colour-hist dist.", "HF energy", "HF gap to real", "prompt colour found"], rows),
        "",
        f"Smallest HF-energy gap to the real sharp images: **{best}**.",
        "",
        f"![Table 2 models grid]({_rel(t['grid'], out_dir)}) — rows: the models in table order; columns: seeds 0–7.",
        "",
    ]


def _refiner_section(r: dict, out_dir: str) -> list[str]:
    f = r["refiner"]
    rows = [[x["images"], x["hf_energy"], x["hf_gap_to_real"], x["laplacian_variance"], x["mean_abs_change"]]
            for x in f["rows"]]
    return [
        "## 4. Refiner (Sec. 2.5)",
        "",
        f"Refiner R (refiner UNet layout, trained on t < 200, aesthetic-score conditioned) applied to the base "
        f"samples of experiment 2 by SDEdit at strength {r['config']['refiner_strength']} (first timestep "
        f"{f['start_timestep']}), aesthetic score 6.0 / negative 2.5, same seeds. Real HF energy "
        f"{fmt(f['real_hf_energy'])}.",
        "",
        table(["images", "HF energy", "HF gap to real", "Laplacian variance", "mean |refined − base|"], rows),
        "",
        f"![refiner grid]({_rel(f['grid'], out_dir)}) — rows in table order; columns: seeds 0–7.",
        "",
    ]


def render_markdown(results: dict, out_dir: str) -> str:
    lines = _header(results)
    for section in (_crop_section, _size_section, _table2_section, _refiner_section):
        lines += section(results, out_dir)
    return "\n".join(lines)
