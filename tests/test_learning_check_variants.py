"""experiments/learning_check.py runs `stage=learning_check` with a few of its settings changed."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from experiments.learning_check import chain_config
from pipeline.workflow import _flatten as _flatten_list


def _flatten(overrides) -> list[str]:
    return _flatten_list(OmegaConf.to_container(overrides))


def _args(**kw):
    base = {"root": "/tmp/lc", "images": None, "vae": None, "vae_steps": None, "base_steps": None, "batch": None,
            "lr": None, "t_range": None, "prompts": None, "sample_steps": None, "set": None}
    return argparse.Namespace(**{**base, **kw})


def test_unset_options_keep_the_stage_and_set_ones_come_last(tmp_path):
    plain, overrides = chain_config(_args(root=str(tmp_path)))
    assert list(plain.workflow.chain) == ["demo_data", "data", "train_vae", "cache_32", "pretrain256", "export",
                                          "evaluate"]
    assert f"paths.root={tmp_path}" in overrides

    cfg, _ = chain_config(_args(root=str(tmp_path), base_steps=50, batch=8, lr=2e-3, t_range="300,1000",
                                vae_steps=7, images=64, set=["train_vae:loader.resolution=64"]))
    base = _flatten(cfg.workflow.overrides["pretrain256"])
    assert base[:len(_flatten(plain.workflow.overrides["pretrain256"]))] == _flatten(
        plain.workflow.overrides["pretrain256"])
    assert base[-6:] == ["train.max_steps=50", "train.checkpoint_every=50", "train.global_batch_size=8",
                         "train.micro_batch_size=8", "train.lr=0.002", "train.t_range=[300,1000]"]
    assert _flatten(cfg.workflow.overrides["train_vae"])[-3:] == ["train.max_steps=7", "train.checkpoint_every=7",
                                                                  "loader.resolution=64"]
    assert _flatten(cfg.workflow.overrides["demo_data"])[-1] == "demo.num_images=64"


def test_a_given_autoencoder_replaces_the_train_vae_step(tmp_path):
    cfg, _ = chain_config(_args(root=str(tmp_path), vae="/models/vae"))
    assert "train_vae" not in cfg.workflow.chain
    for step in ("cache_32", "pretrain256"):
        assert "++train.vae_from=/models/vae" in _flatten(cfg.workflow.overrides[step])
    assert "export.vae=/models/vae" in _flatten(cfg.workflow.overrides["export"])
