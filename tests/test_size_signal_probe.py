"""experiments/size_signal_probe.py: its features tell blurry from sharp images, and it runs end to end on generated
data with a freshly trained (2-step) autoencoder."""

from __future__ import annotations

import numpy as np
import torch

from experiments import size_signal_probe as probe


def test_features_separate_sharp_from_blurred_images_and_not_random_labels():
    rng = torch.Generator().manual_seed(0)
    sharp = [torch.rand(3, 32, 32, generator=rng) * 2 - 1 for _ in range(40)]
    blurred = [torch.nn.functional.avg_pool2d(t[None], 3, 1, 1)[0] for t in sharp]
    features = [probe.sharpness_features(t) for t in sharp + blurred]
    labels = np.array([1] * 40 + [0] * 40)
    assert probe.separability(features, labels)[0] > 0.95
    shuffled = np.random.default_rng(0).permutation(labels)
    assert probe.separability(features, shuffled)[0] < 0.8


def test_train_then_probe_on_generated_images(tmp_path):
    from stages.data.demo_data import generate_demo_dataset

    generate_demo_dataset(str(tmp_path / "images"), 30, seed=0, max_side=128, min_side=8, small_side=32,
                          placement="central")
    probe.train(str(tmp_path / "vae"), levels=3, latent_channels=4, steps=2, images=str(tmp_path / "images"),
                resolution=32)
    result = probe.probe(str(tmp_path / "vae"), str(tmp_path / "images"), 32)
    assert result["images"] == 30
    for key in ("pixels", "latents", "reconstructions"):
        assert 0.0 <= result[f"accuracy_{key}"][0] <= 1.0
    assert result["laplacian_large_over_small_real"] > 1.0  # the generator's large originals are the sharper ones
