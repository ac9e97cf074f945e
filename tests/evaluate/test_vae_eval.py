"""Autoencoder evaluation (Table 3): LPIPS with a locally supplied trunk, reconstruction metrics, the stage."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.tracking import stage_run
from stages.evaluate import metrics, stage, vae_eval
from stages.evaluate.features import build_image_network
from tests.evaluate import eval_config, stage_context, write_dataset


@pytest.fixture(scope="module")
def alex_trunk(tmp_path_factory) -> str:
    """A torchvision alexnet() `features.*` state dict with random weights, as a safetensors file."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    state = {f"features.{k}": v.contiguous() for k, v in alexnet(weights=None).features.state_dict().items()}
    path = str(tmp_path_factory.mktemp("lpips") / "alexnet_features.safetensors")
    save_file(state, path)
    return path


def test_lpips_is_skipped_with_a_reason_without_weights(tmp_path):
    model, reason = metrics.build_lpips(None)
    assert model is None and "evaluate.lpips_weights" in reason
    model, reason = metrics.build_lpips(str(tmp_path / "missing.safetensors"))
    assert model is None and "not found" in reason
    with pytest.raises(ValueError, match="evaluate.lpips_net"):
        metrics.build_lpips(None, net="resnet")


def test_lpips_loads_the_trunk_from_the_file(alex_trunk, tmp_path):
    model, reason = metrics.build_lpips(alex_trunk, net="alex")
    assert reason == ""
    from safetensors.torch import load_file

    stored = load_file(alex_trunk)
    assert torch.equal(getattr(model.net.slice1, "0").weight, stored["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").weight, stored["features.10.weight"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert metrics.lpips(model, x, x) == pytest.approx(0.0, abs=1e-7)
    assert metrics.lpips(model, x, y) > 0
    wrong = str(tmp_path / "wrong.safetensors")
    save_file({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="lacks alex trunk weights"):
        metrics.build_lpips(wrong, net="alex")


def test_reconstruction_metrics_of_a_perfect_and_a_noisy_autoencoder():
    net, _ = build_image_network("random_small")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    perfect = vae_eval.reconstruction_metrics(images, images.clone(), net)
    assert perfect["psnr"] == float("inf") and perfect["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rfid"] == pytest.approx(0.0, abs=1e-6) and perfect["lpips"] is None
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    worse = vae_eval.reconstruction_metrics(images, noisy, net)
    assert 15 < worse["psnr"] < 25 and worse["ssim"] < 1 and worse["rfid"] > 0
    assert perfect["sharpness_kept"] == pytest.approx(1.0) and worse["sharpness_kept"] > 1  # noise adds "detail"
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    assert vae_eval.reconstruction_metrics(images, blurred, net)["sharpness_kept"] < 0.5


def test_reconstruct_returns_images_in_range():
    from sdxl.models import build_vae

    vae = build_vae("tiny").eval()
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    out = vae_eval.reconstruct(vae, images, batch_size=2)
    assert out.shape == (3, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def _demo_batch(count: int, side: int = 48) -> torch.Tensor:
    """uint8 [N, 3, side, side] demo images (a coloured shape on a plain background), as the held-out loader gives."""
    from stages.data.demo_data import render
    from tests.evaluate import demo_params

    images = [render(demo_params(i, side)).resize((side, side)) for i in range(count)]
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])


def test_readback_of_a_perfect_and_a_hue_shifting_autoencoder():
    originals = _demo_batch(14)
    perfect = vae_eval.ReadbackAgreement()
    perfect.add(originals, originals.float() / 255)
    result = perfect.result()
    assert result["num_images"] == result["num_with_object"] == 14
    assert result["object_color"] == result["background"] == result["position"] == 1.0
    assert result["shape"] == 1.0 and result["num_with_shape"] >= 12  # a centre crop may cut an object's outline
    swapped = vae_eval.ReadbackAgreement()  # RGB → BRG: every hue moves, the shapes stay where they were
    swapped.add(originals, originals[:, [2, 0, 1]].float() / 255)
    shifted = swapped.result()
    # white, gray and black backgrounds survive a channel permutation; blue, brown and beige do not
    assert shifted["object_color"] < 0.5 and shifted["background"] < 0.75


def test_readback_counts_colour_position_and_shape_only_where_the_original_shows_them():
    plain = torch.full((2, 3, 32, 32), 0, dtype=torch.uint8)  # black: a demo background, no object
    readback = vae_eval.ReadbackAgreement()
    readback.add(plain, plain.float() / 255)
    assert readback.result() == {"object_color": None, "background": 1.0, "position": None, "shape": None,
                                 "num_images": 2, "num_with_object": 0, "num_with_shape": 0}
    with pytest.raises(ValueError, match="read back"):
        vae_eval.ReadbackAgreement().result()


def test_readback_runs_only_on_demo_captions():
    assert vae_eval.is_demo_vocabulary(["a red circle in the top left on a blue background"] * 9 + ["a photo"])
    assert not vae_eval.is_demo_vocabulary(["a photo of a dog"] * 5 + ["a red circle in the top left on a blue "
                                                                        "background"])
    assert not vae_eval.is_demo_vocabulary([])


@pytest.mark.slow  # an MLflow SQLite store and a tiny VAE over the held-out images: ~15 s on a loaded box
def test_vae_stage_logs_reconstruction_metrics(tmp_path, alex_trunk):
    root = str(tmp_path / "root")
    write_dataset(os.path.join(root, "data", "default"), n=16, size=32)
    cfg = eval_config(root, kind="vae", allow_random=True, resolution=32, val_fraction=0.5, device="cpu",
                      lpips_weights=alex_trunk, lpips_net="alex")
    with stage_run(cfg, "evaluate") as tracker:
        summary = stage.run(cfg, stage_context(cfg)(tracker))
    assert summary["kind"] == "vae" and summary["lpips"] == "on"
    assert summary["vae_source"].startswith("preset:")
    for name in ("results.csv", "results.md", "reconstructions.png", "summary.json"):
        assert os.path.isfile(os.path.join(summary["output_dir"], name)), name
    logged = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri).get_run(tracker.run_id).data.metrics
    assert {"vae_psnr", "vae_ssim", "vae_lpips", "vae_rfid", "vae_sharpness_kept"} <= set(logged)
    assert logged["vae_lpips"] > 0 and logged["vae_rfid"] >= 0
    # demo captions: the reader's agreement between originals and reconstructions is reported and logged
    assert summary["readback"]["num_images"] == summary["num_references"]
    for key in ("object_color", "background", "position", "shape"):
        assert f"vae_readback_{key}" in logged and 0 <= logged[f"vae_readback_{key}"] <= 1
