"""The generated block of docs/results.md from ``experiments/paper_effects.py``'s results (tables, statistics, grids,
and a mechanical verdict per effect: significant at p < 0.01 in the paper's direction, or not)."""

from __future__ import annotations

import os

ALPHA = 0.01


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _ci(stat: dict, digits: int = 3) -> str:
    lo, hi = stat.get("ci", [None, None])
    value = next((stat[k] for k in ("mean", "difference", "slope") if stat.get(k) is not None), None)
    if value is None:
        return "–"
    return f"{_num(value, digits)} [{_num(lo, digits)}, {_num(hi, digits)}]" if lo is not None else _num(value, digits)


def _p(value) -> str:
    return "–" if value is None else (f"{value:.1e}" if value < 1e-3 else f"{value:.3f}")


def _verdict(p, direction_ok: bool) -> str:
    if p is None:
        return "**not measurable**"
    return "**significant**" if p < ALPHA and direction_ok else "**not significant**"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _rel(path: str, out_dir: str) -> str:
    return os.path.relpath(path, out_dir)


def _header(r: dict) -> list[str]:
    # Complete steps are skipped on a re-run, so this call's own time says little; each step's marker keeps the
    # seconds of the call that completed it.
    chain_seconds = sum(info.get("seconds", 0) for info in r["training"].values())
    lines = [f"Command: `{r['command']}` — this call {r['seconds']['total']:.0f} s ({r['seconds']['training']:.0f} s "
             f"of it training; complete steps are skipped); the chain's steps took {chain_seconds:.0f} s when each "
             f"ran, on {r['machine']}.", "",
             f"Sampling: our sampler (sdxl.sampling), {r['sampler']}, {r['sample_steps']} steps, guidance "
             f"{r['guidance_scale']}; {r['seeds']} samples per setting, sample i from initial-noise seed i in every "
             "setting (so settings differ only in what is varied). Held-out prompts: demo vocabulary, seed 1. "
             "Intervals: 95% bootstrap.", "", "Training (the shipped stages, `stage=paper_effects`):", ""]
    rows = [[step, _num(info.get("step")), _num(info.get("samples")),
             _num(None if info.get("seconds") is None else round(info["seconds"]))]
            for step, info in r["training"].items()]
    return lines + _table(["step", "steps trained", "samples (images)", "seconds"], rows) + [""]


def _crop(r: dict, out_dir: str) -> list[str]:
    c = r["crop"]["summary"]
    h, w = r["crop"]["original_size"]
    sq = c["square"]
    rows = [["(0, 0), square c_size (64, 64)", "0.500", "–", _ci(sq["position"]), _ci(sq["found"], 2),
             _ci(sq["touches_border"], 2)]]
    real = {o["offset"]: o["position"] for o in c.get("real", [])}
    for o in c["per_offset"]:
        rows.append([f"{o['offset']} px", _num(o["expected"]), _ci(real.get(o["offset"], {})), _ci(o["position"]),
                     _ci(o["found"], 2), _ci(o["touches_border"], 2)])
    s, sl, oc = c["spearman"], c["slope"], c["off_centre_largest_vs_square"]
    ok = s["rho"] is not None and s["rho"] < 0
    return [
        "## 1. Crop conditioning (Sec. 2.2, Fig. 5)", "",
        f"Model `size_cond`. c_size = ({h}, {w}) with c_crop = (0, x) on even seeds and ({w}, {h}) with (x, 0) on odd "
        "seeds: a 3:2 original of a centred object, which Alg. 1 resizes to 32×48 and crops along its long side. "
        "Where the object lands along that axis follows from x (expected position); the first row is c_crop = (0, 0) "
        "with a square c_size, where nothing was cropped. Position = the centroid of the non-background pixels; "
        "\"real images cut so\" is the same measure on the training data's 3:2 originals cropped at that offset "
        "(what a model that learnt the effect draws).", "",
        *_table(["c_crop offset x", "expected position", "real images cut so", "generated: position", "object drawn",
                 "touches the frame"], rows), "",
        f"Spearman ρ(x, position) = {_num(s['rho'])} (p = {_p(s['p'])}, n = {s['n']}); slope "
        f"{_ci(sl, 4)} per px against {_num(c['expected_slope'], 4)} expected. Distance from the centre at x = "
        f"{c['per_offset'][-1]['offset']} minus at (0, 0) square: {_ci(oc)} (Mann-Whitney p = {_p(oc['p'])}). "
        f"Verdict: {_verdict(s['p'], ok)}.", "", _use_line(r["use"]["size_cond"]["crop"], "a mirrored c_crop"), "",
        f"![crop conditioning]({_rel(r['crop']['grid'], out_dir)})", "",
        "Rows: (0, 0) square, then x = " + ", ".join(str(o["offset"]) for o in c["per_offset"]) + "; columns: seeds.",
        ""]


def _use_line(u: dict, what: str) -> str:
    return (f"Does the model use it at all? Training images cropped by Alg. 1 and denoised with {what} instead of "
            f"their own (same caption and noise, timesteps {u['timesteps']}): the x0 error rises by "
            f"{100 * u['gain']:+.2f}% (z = {u['z']:.1f}, {u['num_images']} images; z >> 3 means it is used).")


def _size(r: dict, out_dir: str) -> list[str]:
    s = r["size"]
    lines = ["## 2. Size conditioning (Sec. 2.2, Fig. 3)", "",
             "Square c_size from 12 to 128 px, c_crop = (0, 0), same prompts and noise. `no_size_cond` never saw "
             "c_size vary (it trained with the crop's own size), so it is the control. Sharpness: variance of the "
             "Laplacian and the spectral share above a quarter of the frequency disc (stages/evaluate/measures.py).",
             ""]
    for name in ("size_cond", "no_size_cond"):
        m = s[name]
        rows = [[str(p["c_size"]), _ci(p["laplacian_variance"], 4), _ci(p["hf_energy"])] for p in m["per_size"]]
        d, rho = m["largest_vs_smallest"], m["spearman_laplacian"]
        ok = d["mean"] is not None and d["mean"] > 0
        lines += [f"`{name}`:", "", *_table(["c_size", "Laplacian variance", "HF energy"], rows), "",
                  f"Spearman ρ(log c_size, Laplacian) = {_num(rho['rho'])} (p = {_p(rho['p'])}); largest − smallest "
                  f"c_size, paired: {_ci(d, 4)} ({_num(d['relative'], 2)} relative, Wilcoxon p = {_p(d['p'])}). "
                  f"Verdict: {_verdict(d['p'], ok)}.", "",
                  _use_line(r["use"][name]["size"], "a c_size from the other side of 32 px (small ↔ large)"), "",
                  f"![size conditioning, {name}]({_rel(s['grids'][name], out_dir)})", ""]
    real = s["real"]
    lines += [f"The data itself (600 training images, centre crop at 32 px): Laplacian variance "
              f"{_ci(real['small']['laplacian_variance'], 4)} for originals under 32 px against "
              f"{_ci(real['large']['laplacian_variance'], 4)} for the rest (Mann-Whitney p = "
              f"{_p(real['large_minus_small']['p'])}).", ""]
    return lines


def _table2(r: dict, out_dir: str) -> list[str]:
    t = r["table2"]
    rows, diffs = [], []
    for name, m in t["summary"].items():
        rows.append([name, str(tuple(t["models"][name]["c_size"])), _ci(m["background_accuracy"], 2),
                     _ci(m["object_color_accuracy"], 2), _ci(m["position_accuracy"], 2), _num(m["lightness_auc"], 2),
                     _ci(m["laplacian_variance"], 4), _ci(m["sharpness_gap"], 4)])
        for key, d in (m.get("vs_size_cond") or {}).items():
            diffs.append([name, key, _ci(d, 3), _p(d["p"])])
    return ["## 3. Table 2 analogue", "",
            "Three base models trained alike except for what Table 2 varies (same steps, batches, seeds): "
            "`size_cond` (c_size = the original's size), `no_size_cond` (c_size = the crop's size, always) and "
            "`large_only` (originals under 32 px discarded: 40% of the data). Known-answer accuracies from the pixels "
            "(stages/evaluate/prompt_following.py) and the sharpness gap |Laplacian − the large originals' mean|.",
            "",
            *_table(["model", "c_size", "background", "object colour", "position", "lightness AUC",
                     "Laplacian variance", "sharpness gap"], rows), "",
            "Differences from `size_cond` (model − size_cond, paired by prompt and noise; accuracy: exact McNemar p; "
            "gap: Wilcoxon p):", "", *_table(["model", "measure", "difference", "p"], diffs), "",
            f"![Table 2 models]({_rel(t['grid'], out_dir)})", "", "Rows: size_cond, no_size_cond, large_only.", ""]


def _refiner(r: dict, out_dir: str) -> list[str]:
    f = r["refiner"]["summary"]
    rows = [[key, _ci(f[key], 4), _num(f[key]["relative"], 2), _p(f[key]["p"])]
            for key in ("laplacian_variance", "hf_energy", "sharpness_gap")]
    return ["## 4. Refiner (Sec. 2.5)", "",
            f"`size_cond` samples (c_size {tuple([128, 128])}) against the same samples refined by SDEdit at strength "
            f"{r['refiner']['strength']} with the refiner trained on the first 200 noise levels.", "",
            *_table(["refined − base", "difference", "relative", "Wilcoxon p"], rows), "",
            f"Background and object colour read the same before and after: {_ci(f['readings_kept'], 2)}; background "
            f"accuracy change {_ci(f['background_accuracy'], 3)} (p = {_p(f['background_accuracy']['p'])}), object "
            f"colour {_ci(f['object_color_accuracy'], 3)} (p = {_p(f['object_color_accuracy']['p'])}).", "",
            f"![refiner]({_rel(r['refiner']['grid'], out_dir)})", "", "Rows: base, refined.", ""]


def render_markdown(results: dict, out_dir: str) -> str:
    return "\n".join([*_header(results), *_crop(results, out_dir), *_size(results, out_dir),
                      *_table2(results, out_dir), *_refiner(results, out_dir)])


def summary_lines(r: dict) -> str:
    c, s = r["crop"]["summary"], r["size"]["size_cond"]
    return "\n".join([
        f"crop: Spearman rho(offset, position) {_num(c['spearman']['rho'])} p {_p(c['spearman']['p'])}; "
        f"slope {_ci(c['slope'], 4)} vs {_num(c['expected_slope'], 4)} expected",
        f"size: largest - smallest c_size Laplacian {_ci(s['largest_vs_smallest'], 4)} "
        f"p {_p(s['largest_vs_smallest']['p'])}; control "
        f"{_ci(r['size']['no_size_cond']['largest_vs_smallest'], 4)} p "
        f"{_p(r['size']['no_size_cond']['largest_vs_smallest']['p'])}",
        "table 2: " + "; ".join(f"{name} background {_ci(m['background_accuracy'], 2)} gap "
                                f"{_ci(m['sharpness_gap'], 4)}" for name, m in r["table2"]["summary"].items()),
        "use: " + "; ".join(f"{n} {k} {100 * u[k]['gain']:+.2f}% z {u[k]['z']:.1f}" for n, u in r["use"].items()
                            for k in ("crop", "size")),
        f"refiner: Laplacian {_ci(r['refiner']['summary']['laplacian_variance'], 4)} p "
        f"{_p(r['refiner']['summary']['laplacian_variance']['p'])}",
        f"wall {r['seconds']['total']:.0f} s (training {r['seconds']['training']:.0f} s)"])
