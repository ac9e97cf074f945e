"""experiments/learning_check.py composes the demo's chain with shorter runs (the chain itself takes minutes)."""

from __future__ import annotations

import argparse

from experiments.learning_check import chain_config


def _args(**kw):
    base = {"root": "/tmp/lc", "images": 200, "vae": None, "vae_steps": 2, "base_steps": 150, "batch": 32,
            "resolution": 32}
    return argparse.Namespace(**{**base, **kw})


def _flat(items):
    for item in items:
        if isinstance(item, (list, tuple)) or hasattr(item, "__iter__") and not isinstance(item, str):
            yield from _flat(item)
        else:
            yield item


def test_the_chain_trains_its_own_autoencoder_or_uses_a_given_one(tmp_path):
    cfg, overrides = chain_config(_args(root=str(tmp_path)))
    assert list(cfg.workflow.chain) == ["demo_data", "data", "train_vae", "cache_32", "pretrain256", "export",
                                        "evaluate"]
    assert "train.max_steps=2" in list(_flat(cfg.workflow.overrides["train_vae"]))
    base = list(_flat(cfg.workflow.overrides["pretrain256"]))
    assert base[-6:] == ["train.max_steps=150", "train.global_batch_size=32", "train.micro_batch_size=32",
                         "train.sample_every=100000", "train.eval_every=100000", "loader.resolution=32"]
    assert "evaluate.kind=prompt_following" in list(_flat(cfg.workflow.overrides["evaluate"]))
    assert f"paths.root={tmp_path}" in overrides and "stage=demo" not in overrides

    cfg, _ = chain_config(_args(root=str(tmp_path), vae="/models/vae"))
    assert "train_vae" not in cfg.workflow.chain
    for step in ("cache_32", "pretrain256"):
        assert "++train.vae_from=/models/vae" in list(_flat(cfg.workflow.overrides[step]))
    assert "export.vae=/models/vae" in list(_flat(cfg.workflow.overrides["export"]))
