"""The trainer learns: `stage=learning_check` trains a small (`micro`) base through the real stages (demo data →
data stage → autoencoder → latent cache → pretrain256 under Ray Train → diffusers export) and the exported base,
sampled by diffusers' StableDiffusionXLPipeline with classifier-free guidance, draws backgrounds as light or dark as
its held-out prompts ask, far above chance. A change that cuts the prompt off from the pixels (text conditioning,
guidance, the export) leaves that at chance and fails this test (pipeline/conf/stage/learning_check.yaml has the
goal)."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir

from pipeline.dispatch import execute

# ~3 min here (187 s on an AVX2 host, 2026-12-05). Hosts were seen whose tiny-model steps run 2.5-3x slower than
# that (docs/decisions.md, 2026-12-05); 1200 s leaves room for them without hiding a hang for long.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]

CONF = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf"))


def test_a_short_run_through_the_real_stages_learns_the_demo_data(tmp_path, ray_local):
    overrides = [f"paths.root={tmp_path / 'root'}", "mlflow.enabled=false"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, "stage=learning_check"])
        result = execute("learning_check", cfg, overrides=overrides)  # raises LearningCheckFailed below a goal

    verdict = result["learning_check"]
    assert verdict["passed"] and verdict["goals"] == "background_lightness_auc >= 0.85", verdict
    assert verdict["background_lightness_chance"] == 0.5
    score = result["stages"]["evaluate"]["prompt_following"]
    assert score["source"].startswith("diffusers StableDiffusionXLPipeline")  # the export, as a user loads it
    assert score["num_images"] == 63
    # Far above chance, not merely above it: a model that ignores its prompt scores 0.5 (sd ~0.04 here).
    assert score["background_lightness_auc"] >= 0.85
    # The model was trained, in the chain, on what the data stage wrote.
    assert result["stages"]["pretrain256"]["step"] == cfg_steps(cfg)
    assert os.path.isfile(score["grid"])


def cfg_steps(cfg) -> int:
    from omegaconf import OmegaConf

    from pipeline.workflow import _flatten

    overrides = _flatten(OmegaConf.to_container(cfg.workflow.overrides["pretrain256"]))
    steps = [o for o in overrides if o.startswith("train.max_steps=")]
    return int(steps[-1].split("=", 1)[1])
