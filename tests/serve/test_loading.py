"""Where served weights come from: a stage's final/ folder (EMA served), a save_pretrained folder, an MLflow
registered model version, or the seeded random preset."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sdxl.models import build_unet, build_vae
from stages.serve.loading import ModelSources, component_folder, load_unet, load_vae, resolve_folder


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _write_final(root, stage: str = "pretrain256"):
    """A training stage's final/ folder: model/ (raw) and ema/ (different weights) + info.json."""
    final = root / "runs" / stage / "final"
    raw, ema = build_unet("tiny", "base", seed=1), build_unet("tiny", "base", seed=2)
    raw.save_pretrained(final / "model")
    ema.save_pretrained(final / "ema")
    (final / "info.json").write_text(json.dumps({"stage": stage, "step": 3}))
    return final, raw, ema


def test_random_preset_is_the_same_in_every_replica():
    sources = ModelSources(preset="tiny", seed=5)
    assert _same_weights(load_unet(sources, "base"), load_unet(sources, "base"))
    assert not _same_weights(load_unet(sources, "base"), load_unet(ModelSources(preset="tiny", seed=6), "base"))


def test_stage_final_folder_serves_its_ema_weights(tmp_path):
    _, raw, ema = _write_final(tmp_path)
    for source in ("runs/pretrain256/final", "runs/pretrain256/final/ema", str(tmp_path / "runs/pretrain256/final")):
        unet = load_unet(ModelSources(preset="tiny", root=str(tmp_path), base=source), "base")
        assert _same_weights(unet, ema) and not _same_weights(unet, raw)


def test_diffusers_pipeline_folder_layout(tmp_path):
    pipe = tmp_path / "sdxl"
    vae = build_vae("tiny", seed=9)
    vae.save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text("{}")
    assert component_folder(str(pipe), "vae") == (str(pipe), "vae")
    assert _same_weights(load_vae(ModelSources(preset="tiny", root=str(tmp_path), vae="sdxl")), vae)


def test_a_wider_trained_vae_is_served_and_another_latent_grid_is_refused(tmp_path):
    from sdxl.presets import get_preset

    wide = build_vae("tiny", seed=9, config=get_preset("tiny").vae_config([32, 64, 64], layers_per_block=2))
    wide.save_pretrained(tmp_path / "wide")
    assert _same_weights(load_vae(ModelSources(preset="tiny", root=str(tmp_path), vae="wide")), wide)
    # an 8x (four-level) autoencoder, the full preset's grid, at tiny widths
    four_levels = dict(get_preset("tiny").vae, block_out_channels=[16, 32, 32, 32],
                       down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    from diffusers import AutoencoderKL
    AutoencoderKL(**four_levels).save_pretrained(tmp_path / "f8")
    with pytest.raises(ValueError, match="8x downsampling.*serve.preset"):
        load_vae(ModelSources(preset="tiny", root=str(tmp_path), vae="f8"))


def test_missing_or_mismatched_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_folder("nowhere", str(tmp_path), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        component_folder(str(tmp_path / "empty"), "unet")
    build_unet("tiny", "refiner").save_pretrained(tmp_path / "refiner")
    with pytest.raises(ValueError, match="serve.preset"):
        load_unet(ModelSources(preset="tiny", root=str(tmp_path), base="refiner"), "base")


@pytest.mark.slow  # creating the MLflow SQLite store takes ~15 s on 2 busy cores
def test_mlflow_registered_model_version(tmp_path):
    from mlflow import MlflowClient

    final, _, ema = _write_final(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiment = client.create_experiment("serve-test", artifact_location=str(tmp_path / "mlartifacts"))
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(final / "ema"), "final/ema")
    client.create_registered_model("base")
    # As stages/train registers it: the version's source is the run's final/ema artifact folder.
    source = client.get_run(run.info.run_id).info.artifact_uri.rstrip("/") + "/final/ema"
    version = client.create_model_version("base", source=source, run_id=run.info.run_id)
    sources = ModelSources(preset="tiny", root=str(tmp_path / "elsewhere"), tracking_uri=tracking_uri,
                           base=f"models:/base/{version.version}")
    assert os.path.isfile(os.path.join(resolve_folder(sources.base, sources.root, tracking_uri), "config.json"))
    assert _same_weights(load_unet(sources, "base"), ema)
    with pytest.raises(ValueError, match="tracking_uri"):
        resolve_folder("models:/base/1", str(tmp_path), None)
