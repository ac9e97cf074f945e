"""`evaluate.fid_weights` with torch-fidelity's FID Inception, offline: the stage builds the extractor from a local
weights file (a path, or the torch hub cache a cluster node fills once for `torch_fidelity`) and never downloads.

The weights are a random-init state dict of torch-fidelity's own network class, saved to disk: the real
pt_inception-2015-12-05 file has the same keys and shapes, and no package here ships it.
"""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from stages.evaluate.features import image_features
from stages.evaluate.stage import build_scorers

CONF = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf"))


@pytest.fixture(scope="module")
def inception_state_dict() -> dict[str, torch.Tensor]:
    """torch-fidelity's FeatureExtractorInceptionV3 with fixed-seed random weights (its loading step skipped)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch weights over the network fails the test."""
    import torch.hub

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _evaluate_section(fid_weights: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=["preset=tiny", "stage=evaluate",
                                                       f"evaluate.fid_weights={fid_weights}"])
    return cfg.evaluate


def _assert_extractor_holds(scorers, state: dict[str, torch.Tensor]) -> None:
    loaded = scorers.net.net.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k].cpu(), state[k]) for k in state)
    images = torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = image_features(scorers.net, images)
    assert out["pool"].shape == (1, 2048) and out["logits"].shape == (1, 1008)
    assert torch.isfinite(out["pool"]).all()


def test_fid_weights_path_builds_torch_fidelity_inception_from_that_file(tmp_path, inception_state_dict,
                                                                         no_downloads):
    path = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(inception_state_dict, path)
    scorers = build_scorers(_evaluate_section(str(path)))
    assert scorers.net_weights == f"pt_inception-2015-12-05 from {path}"
    _assert_extractor_holds(scorers, inception_state_dict)


def test_fid_weights_torch_fidelity_uses_the_hub_cache_without_a_download(tmp_path, monkeypatch, inception_state_dict,
                                                                          no_downloads):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(URL_INCEPTION_V3)
    cached.parent.mkdir(parents=True)
    torch.save(inception_state_dict, cached)
    scorers = build_scorers(_evaluate_section("torch_fidelity"))
    assert scorers.net_weights == "pt_inception-2015-12-05 (torch-fidelity)"
    _assert_extractor_holds(scorers, inception_state_dict)
