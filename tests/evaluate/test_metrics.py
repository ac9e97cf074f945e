"""Known-answer tests of the metrics: closed-form FID of Gaussians, IS extremes, CLIP score bounds, PSNR / SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from stages.evaluate import metrics


def _closed_form_fid(mu1, cov1, mu2, cov2) -> float:
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * covmean))


def test_fid_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    dim, n = 4, 40_000
    mu1, mu2 = np.zeros(dim), np.array([1.0, -0.5, 0.25, 0.0])
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    cov1, cov2 = a @ a.T / dim + 0.5 * np.eye(dim), b @ b.T / dim + 0.2 * np.eye(dim)
    x = rng.multivariate_normal(mu1, cov1, size=n)
    y = rng.multivariate_normal(mu2, cov2, size=n)
    expected = _closed_form_fid(mu1, cov1, mu2, cov2)
    # Standard error of the estimate, to first order: the mean term and the covariance terms (each O(1/sqrt(n))).
    d, s = mu1 - mu2, cov1 + cov2
    stderr = math.sqrt((4 * d @ s @ d + 2 * np.trace(s @ s)) / n)
    got = metrics.frechet_distance(torch.from_numpy(x), torch.from_numpy(y))
    assert abs(got - expected) < 6 * stderr, (got, expected, stderr)
    assert expected > 1.0  # the test distinguishes the two sets


def test_fid_of_a_set_with_itself_is_zero_and_distance_grows_with_shift():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    near = metrics.frechet_distance(x, x + 0.1)
    far = metrics.frechet_distance(x, x + 1.0)
    assert near == pytest.approx(8 * 0.01, rel=1e-6) and far == pytest.approx(8.0, rel=1e-6)


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="differ in width"):
        metrics.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.frechet_distance(torch.zeros(5), torch.zeros(5, 4))


def test_inception_score_extremes():
    num_classes = 10
    uniform = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    assert metrics.inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-9)
    one_hot = 50.0 * torch.eye(num_classes, dtype=torch.float64)  # confident and every class once
    assert metrics.inception_score(one_hot)[0] == pytest.approx(num_classes, rel=1e-6)
    same_class = 50.0 * torch.eye(num_classes, dtype=torch.float64)[[3] * num_classes]  # confident, no diversity
    assert metrics.inception_score(same_class)[0] == pytest.approx(1.0, abs=1e-6)
    assert metrics.inception_score(torch.cat([one_hot, one_hot]))[0] == pytest.approx(num_classes, rel=1e-6)
    mean, std = metrics.inception_score(torch.zeros(8, 4, dtype=torch.float64), splits=2)
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(one_hot, splits=11)


def test_clip_score_bounds():
    e = torch.nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert metrics.clip_score(e, e) == pytest.approx(100.0, abs=1e-4)
    assert metrics.clip_score(e, 3.0 * e) == pytest.approx(100.0, abs=1e-4)  # scale-free
    basis = torch.eye(4)
    assert metrics.clip_score(basis, basis.roll(1, dims=0)) == pytest.approx(0.0, abs=1e-6)  # orthogonal
    assert metrics.clip_score(basis, -basis) == 0.0  # clamped at 0, as torchmetrics
    half = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert metrics.clip_score(*half) == pytest.approx(100 / math.sqrt(2), rel=1e-5)
    with pytest.raises(ValueError, match="equal shape"):
        metrics.clip_score(torch.zeros(2, 3), torch.zeros(3, 3))


def test_psnr_and_ssim_known_values():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert metrics.psnr(x, x) == math.inf
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    a, b = torch.full((2, 3, 16, 16), 0.5), torch.full((2, 3, 16, 16), 0.6)  # MSE 0.01 → 20 dB
    assert metrics.psnr(a, b) == pytest.approx(20.0, abs=1e-4)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert metrics.ssim(noisy, x) < 0.9
    with pytest.raises(ValueError, match="equal shape"):
        metrics.psnr(x, x[:, :, :16])


def test_finite_or_none():
    assert metrics.finite_or_none(float("nan")) is None
    assert metrics.finite_or_none(math.inf) == 1e9
    assert metrics.finite_or_none(2.5) == 2.5
