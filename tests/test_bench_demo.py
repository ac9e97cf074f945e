"""benchmarks/bench_demo.py reads the demo's step markers into the figures RESULTS.md shows."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_demo import demo_chain, figures, read_markers


def _write_markers(root, chain):
    start = 1_000_000.0
    for i, step in enumerate(chain):
        result = {"seconds": 10.0}
        if step == "evaluate_vae":
            result["metrics"] = {"vae_psnr": 25.5, "vae_readback_object_color": 0.61234,
                                 "vae_readback_background": 1.0, "vae_readback_position": None}
        if step == "evaluate":
            result["prompt_following"] = {
                "source": "diffusers", "num_images": 63, "object_color_accuracy": 0.5, "object_color_chance": 1 / 7,
                "background_accuracy": 0.95, "background_chance": 1 / 6, "position_accuracy": 0.2,
                "position_chance": 1 / 9, "reader_on_real_images": {"background_accuracy": 1.0, "num_images": 9},
                "conditioning_use": {name: {"gain": gain, "z": 4.04, "gain_per_timestep": {}}
                                     for name, gain in (("object_color", 0.0812), ("background", 5.4), ("position", 0.0))}}
        folder = root / "workflow" / "demo"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{step}.json").write_text(json.dumps({"finished_at": start + 10.0 * (i + 1), "result": result}))


def test_figures_sum_the_steps_and_compare_with_the_goals(tmp_path):
    chain = demo_chain()
    assert chain[0] == "demo_data" and {"evaluate_vae", "evaluate", "generate"} <= set(chain)
    _write_markers(tmp_path, chain)
    out = figures(read_markers(str(tmp_path), chain))
    assert out["steps_total_s"] == 10.0 * len(chain) == out["span_s"]
    assert out["vae_psnr_db"] == 25.5 and out["background_accuracy"] == 0.95
    assert out["meets_goals"] == {"vae_psnr_db": True, "object_color_accuracy": False, "background_accuracy": True,
                                  "position_accuracy": False, "steps_total_s": True}
    assert out["reader_on_real_images"] == {"background_accuracy": 1.0}
    assert out["vae_readback"] == {"object_color": 0.612, "background": 1.0}  # position: no object was read
    assert out["conditioning_use"]["object_color"] == {"gain": 0.081, "z": 4.0}
    assert out["conditioning_use"]["position"]["gain"] == 0.0


def test_an_unfinished_demo_is_named(tmp_path):
    chain = demo_chain()
    _write_markers(tmp_path, chain[:3])
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_markers(str(tmp_path), chain)
