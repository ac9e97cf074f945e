from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from stages.data import scorers

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _section(tmp_path, **overrides):
    base = {"enabled": True, "arch": "test-tiny-clip", "pretrained": None, "model_config": TINY_CLIP,
            "aesthetic_weights": None, "watermark_weights": None, "nsfw_weights": None, "random_init_ok": True,
            "device": "cpu", "batch_size": 2, "seed": 0}
    base.update(overrides)
    return OmegaConf.create(base)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (20 + 7 * i, 30, 3), dtype=np.uint8)) for i in range(n)]


def test_disabled_scoring_gives_no_scorer(tmp_path):
    assert scorers.ImageTextScorer.from_config(_section(tmp_path, enabled=False)) is None
    assert scorers.from_config(None) is None


def test_scores_have_one_float32_per_image_and_are_deterministic(tmp_path):
    head = torch.nn.Linear(16, 1)
    torch.save(head.state_dict(), tmp_path / "wm.pt")
    mlp = scorers.AestheticMLP(16)
    from safetensors.torch import save_file

    save_file(mlp.state_dict(), str(tmp_path / "aesthetic.safetensors"))
    section = _section(tmp_path, aesthetic_weights=str(tmp_path / "aesthetic.safetensors"),
                       watermark_weights=str(tmp_path / "wm.pt"))
    images, captions = _images(5), ["a red circle", "a blue square", "x", "", "a star"]
    first = scorers.ImageTextScorer.from_config(section).score(images, captions)
    second = scorers.ImageTextScorer.from_config(section).score(images, captions)
    assert set(first) == {"clip_score", "aesthetic_score", "watermark_prob"}
    for name, values in first.items():
        assert values.dtype == np.float32 and values.shape == (5,)
        np.testing.assert_allclose(values, second[name], rtol=1e-5, atol=1e-5)
    assert (first["clip_score"] >= 0).all() and (first["clip_score"] <= 100).all()
    assert ((first["watermark_prob"] >= 0) & (first["watermark_prob"] <= 1)).all()
    # The loaded head really is the saved one.
    scorer = scorers.ImageTextScorer.from_config(section)
    torch.testing.assert_close(scorer.aesthetic.layers[0].weight, mlp.layers[0].weight)


def test_empty_batch_and_mismatched_lengths(tmp_path):
    scorer = scorers.ImageTextScorer.from_config(_section(tmp_path))
    empty = scorer.score([], [])
    assert empty["clip_score"].shape == (0,) and empty["aesthetic_score"].dtype == np.float32
    with pytest.raises(ValueError, match="captions"):
        scorer.score(_images(2), ["one"])


def test_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="scoring.pretrained"):
        scorers.ImageTextScorer.from_config(_section(tmp_path, random_init_ok=False))
    with pytest.raises(FileNotFoundError, match="scoring.pretrained"):
        scorers.ImageTextScorer.from_config(_section(tmp_path, pretrained=str(tmp_path / "nope.pt")))
    with pytest.raises(FileNotFoundError, match="scoring.aesthetic_weights"):
        scorers.ImageTextScorer.from_config(_section(tmp_path, aesthetic_weights=str(tmp_path / "none.pt")))


def test_head_with_wrong_layout_is_named(tmp_path):
    torch.save(torch.nn.Linear(3, 1).state_dict(), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="scoring.nsfw_weights"):
        scorers.ImageTextScorer.from_config(_section(tmp_path, nsfw_weights=str(tmp_path / "bad.pt")))
