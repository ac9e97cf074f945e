"""experiments/paper_effects.py: the chain it trains (stage=paper_effects) and its measuring half, end to end on
models with random weights saved where the chain leaves its models (the training half is the shipped stages,
tested elsewhere; `python experiments/paper_effects.py` runs both)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from hydra import initialize_config_dir

from experiments import effects_models, effects_report, paper_effects

CONF = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "pipeline", "conf"))


def test_the_chain_gives_each_variant_its_own_root_and_what_table_2_varies(tmp_path):
    root = str(tmp_path / "pe")
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = effects_models.step_configs(
            root, ("size_cond_layout", "size_cond", "no_size_cond", "large_only", "refiner", "demo_data"))
        demo = cfg.pop("demo_data").demo
    assert demo.placement == "central" and demo.small_side == 32 and demo.max_side == 128
    for step, c in cfg.items():
        assert c.loader.dataset_dir == f"{root}/data/default" and c.loader.cached and c.loader.resolution == 32
        assert c.train.vae_from == f"{root}/runs/train_vae/final/ema"
    assert cfg["size_cond_layout"].paths.root == cfg["size_cond"].paths.root == f"{root}/models/size_cond"
    assert list(cfg["size_cond_layout"].train.t_range) == [600, 1000] and cfg["size_cond"].train.init_from == "auto"
    assert cfg["size_cond"].train.size_conditioning and not cfg["no_size_cond"].train.size_conditioning
    assert cfg["no_size_cond"].paths.root == f"{root}/models/no_size_cond"
    assert cfg["large_only"].loader.filter == "orig_h >= 32 and orig_w >= 32" and cfg["size_cond"].loader.filter is None
    assert cfg["refiner"].train.task == "refiner" and list(cfg["refiner"].train.t_range) == [0, 200]
    # The detail phase is gentler than the layout phase, so that it keeps the layout's c_crop use (decisions.md).
    assert cfg["size_cond_layout"].train.lr == 1.0e-3 and cfg["size_cond_layout"].train.global_batch_size == 32
    for step in ("size_cond", "no_size_cond", "large_only"):
        assert cfg[step].train.lr == 2.0e-4 and cfg[step].train.global_batch_size == 32
    assert cfg["refiner"].train.lr == 1.0e-3


def test_the_training_table_follows_the_chain(tmp_path):
    from pipeline import storage

    for step, seconds in (("size_cond", 3), ("cache_32", 1), ("size_cond_layout", 2), ("zz_extra", 4)):
        storage.write_json_atomic(str(tmp_path / "workflow" / "paper_effects" / f"{step}.json"),
                                  {"result": {"seconds": seconds, "step": 1, "ignored": 0}})
    summary = effects_models.training_summary(str(tmp_path), ["cache_32", "size_cond_layout", "size_cond"])
    assert list(summary) == ["cache_32", "size_cond_layout", "size_cond", "zz_extra"]
    assert summary["size_cond"] == {"seconds": 3, "step": 1}


def test_layout_steps_set_every_layout_phase_and_reach_the_recorded_command(tmp_path):
    root = str(tmp_path / "pe")
    layouts = ("size_cond_layout", "no_size_cond_layout", "large_only_layout")
    with initialize_config_dir(config_dir=CONF, version_base=None):
        default = effects_models.step_configs(root, (*layouts, "size_cond"))
        longer = effects_models.step_configs(root, (*layouts, "size_cond"), ["workflow.layout_steps=2400"])
    for step in layouts:
        assert default[step].train.max_steps == default[step].train.checkpoint_every == 600
        assert longer[step].train.max_steps == longer[step].train.checkpoint_every == 2400
    assert longer["size_cond"].train.max_steps == default["size_cond"].train.max_steps == 600  # detail phase kept
    parser = paper_effects.build_parser()
    assert paper_effects.command_line(parser.parse_args([]), parser) == "python experiments/paper_effects.py"
    args = parser.parse_args(["--layout-steps", "2400", "--seeds", "128", "--sample-steps", "5", "--skip-training"])
    assert paper_effects.command_line(args, parser) == (
        "python experiments/paper_effects.py --layout-steps 2400 --sample-steps 5 --skip-training")


def _save_random_models(root: str) -> None:
    """Random-weight models where the chain leaves its own, and a few generated training images."""
    from sdxl.models import build_unet, build_vae
    from sdxl.presets import get_preset
    from stages.data.demo_data import generate_demo_dataset

    preset = get_preset("tiny")
    for name in effects_models.BASES:
        build_unet(preset, "base", seed=1).save_pretrained(f"{root}/models/{name}/runs/pretrain512/final/ema")
    build_unet(preset, "refiner", seed=1).save_pretrained(f"{root}/models/size_cond/runs/train_refiner/final/ema")
    build_vae(preset, seed=1).save_pretrained(f"{root}/runs/train_vae/final/ema")
    generate_demo_dataset(f"{root}/demo_images", 12, seed=0, max_side=128, min_side=8, small_side=32,
                          placement="central")


def _numbers(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.mark.slow
def test_measuring_writes_every_section_with_statistics(tmp_path):
    root, out = str(tmp_path / "pe"), tmp_path / "docs"
    _save_random_models(root)
    out.mkdir()
    (out / "results.md").write_text("# Results\n\nCommentary kept across runs.\n")
    results = paper_effects.main(["--root", root, "--out", str(out), "--skip-training", "--seeds", "6",
                                  "--sample-steps", "5"])
    page = (out / "results.md").read_text()
    assert "Commentary kept across runs." in page and page.count(effects_report.BEGIN) == 1
    for heading in ("## 1. Crop conditioning", "## 2. Size conditioning", "## 3. Table 2 analogue", "## 4. Refiner"):
        assert heading in page
    for png in ("crop_conditioning", "size_conditioning_size_cond", "size_conditioning_no_size_cond",
                "table2_models", "refiner"):
        assert (out / "results" / f"{png}.png").stat().st_size > 0 and f"results/{png}.png" in page
    saved = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(v) for v in _numbers(saved))
    crop = saved["crop"]["summary"]
    assert [o["offset"] for o in crop["per_offset"]] == list(paper_effects.CROP_OFFSETS)
    assert crop["expected_slope"] == pytest.approx(-1 / 32)
    assert [p["c_size"] for p in saved["size"]["size_cond"]["per_size"]] == list(paper_effects.SIZES)
    assert set(saved["table2"]["summary"]) == {"size_cond", "no_size_cond", "large_only"}
    assert results["refiner"]["summary"]["laplacian_variance"]["n"] == 6
    for name in ("size_cond", "no_size_cond"):  # micro-conditioning use: both parts measured
        assert saved["use"][name]["crop"]["num_images"] > 0 and saved["use"][name]["size"]["num_images"] == 12


def test_sample_i_starts_from_seed_i_whatever_the_setting_and_its_place():
    class Echo(torch.nn.Module):
        """A 'UNet' whose prediction is zero: the sampler then returns its initial noise (scaled)."""

        def forward(self, sample, timestep, **kwargs):
            return (torch.zeros_like(sample),)

    from sdxl.conditioner import TextConditioner
    from sdxl.models import build_components

    parts = build_components("tiny", kind="base", seed=0)
    models = effects_models.EffectModels(
        bases={"size_cond": Echo()}, refiner=Echo(), vae=parts.vae, vae_scale=1.0,
        conditioner=TextConditioner.from_components(parts, kind="base"),
        refiner_conditioner=None, resolution=32, sample_steps=2, guidance_scale=2.0)
    a = effects_models.sample(models, "size_cond", ["a red circle"], [0, 1, 2], [(12, 12)] * 3, [(0, 0)] * 3)
    b = effects_models.sample(models, "size_cond", ["a red circle"], [2, 1, 0], [(64, 96), (96, 64), (64, 96)],
                              [(0, 4), (4, 0), (0, 8)])
    assert torch.allclose(a[0], b[2], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-4)
    assert not torch.allclose(a[0], a[1], atol=1e-2)


def test_statistics_name_their_test_and_interval():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0, 1, 40), rng.normal(1, 1, 40)
    assert effects_report.paired(low, high)["p"] < 0.01 and effects_report.paired(low, low)["p"] is None
    diff = effects_report.independent(low, high)
    assert diff["ci"][0] < diff["difference"] < diff["ci"][1] and diff["p"] < 0.01
    assert effects_report.spearman([1, 2, 3], [0.5, 0.5, 0.5])["rho"] is None
    assert effects_report.slope([0, 1, 2, 3], [0.0, -1.0, -2.0, -3.0])["slope"] == pytest.approx(-1.0)
    flips = effects_report.mcnemar([False] * 10 + [True] * 10, [True] * 20)
    assert flips["discordant"] == [0, 10] and flips["p"] < 0.01


def test_results_page_keeps_commentary_around_the_generated_block(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(f"intro\n{effects_report.BEGIN}\nold\n{effects_report.END}\ncommentary\n")
    effects_report.write_results_page(str(path), "new tables")
    text = path.read_text()
    assert "intro" in text and "commentary" in text and "new tables" in text and "old" not in text
