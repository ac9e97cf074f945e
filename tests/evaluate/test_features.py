"""Feature networks: deterministic random init, torchmetrics compatibility, pass-through of feature vectors."""

from __future__ import annotations

import pytest
import torch

from stages.evaluate import features, metrics


def _images(n: int, seed: int, size: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_small_network_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    net_a, label = features.build_image_network("random_small", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    net_b, _ = features.build_image_network("random_small", seed=3)
    x = _images(4, 0)
    out_a, out_b = features.image_features(net_a, x), features.image_features(net_b, x)
    assert label == features.RANDOM_NOTE
    assert out_a["pool"].shape == (4, 64) and out_a["logits"].shape == (4, 16)
    assert torch.equal(out_a["pool"], out_b["pool"]) and out_a["pool"].dtype == torch.float64
    # Float images in [0, 1] and their uint8 version give the same features.
    assert torch.allclose(features.image_features(net_a, x.float() / 255)["pool"], out_a["pool"])


def test_feature_view_works_inside_torchmetrics_fid_with_images_and_with_vectors():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net, _ = features.build_image_network("random_small", seed=0)
    view = features.FeatureView(net, "pool")
    fid = FrechetInceptionDistance(feature=view)
    real, fake = _images(6, 1), _images(6, 2)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    from_images = float(fid.compute())
    feats = features.image_features(net, torch.cat([real, fake]))["pool"]
    from_vectors = metrics.frechet_distance(feats[:6], feats[6:])
    assert from_images == pytest.approx(from_vectors, rel=1e-4)
    assert metrics.frechet_distance(feats[:6], feats[:6]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="columns"):
        view(torch.zeros(2, 5))


def test_unknown_fid_weights_are_named():
    with pytest.raises(ValueError, match="evaluate.fid_weights"):
        features.build_image_network("/no/such/inception.pth")


@pytest.mark.slow  # a 27M-parameter network at 299 px: ~10 s on a shared 2-core CPU
def test_random_torchvision_inception_gives_2048_features():
    net, label = features.build_image_network("random_inception", seed=0)
    out = features.image_features(net, _images(1, 0, size=75))
    assert out["pool"].shape == (1, 2048) and out["logits"].shape == (1, 1000) and label == features.RANDOM_NOTE


def test_tiny_clip_embeds_unit_vectors_deterministically():
    clip_a, clip_b = features.ClipEmbedder("tiny", seed=0), features.ClipEmbedder("tiny", seed=0)
    images = _images(3, 5, size=40).float() / 255
    emb = clip_a.encode_images(images)
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(emb, clip_b.encode_images(images))
    text = clip_a.encode_texts(["a red circle", "a blue square", "a red circle"])
    assert torch.allclose(text[0], text[2]) and not torch.allclose(text[0], text[1])
    score = metrics.clip_score(emb, text)
    assert 0.0 <= score <= 100.0 and clip_a.weights == features.RANDOM_NOTE
    with pytest.raises(ValueError, match="list of strings"):
        clip_a.encode_texts("not a list")
