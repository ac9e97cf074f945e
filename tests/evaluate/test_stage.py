"""The evaluate stage end to end on tiny random models, a small dataset and a real (SQLite) MLflow store; checkpoint
resolution; the held-out split; the in-training evaluation."""

from __future__ import annotations

import json
import os

import mlflow
import pytest
import torch

from pipeline.tracking import stage_run
from stages.evaluate import generate, heldout, stage
from tests.evaluate import eval_config, stage_context, write_dataset

FAST = {"num_images": 4, "batch_size": 4, "guidance_scales": [1.5, 5.0], "steps": 2, "resolution": 32,
        "val_fraction": 0.5, "max_references": 16, "device": "cpu"}


def _fake_final(root: str, stage_name: str, run_id: str | None) -> str:
    """``<root>/runs/<stage>/final/{ema,info.json}`` as a finished training stage leaves it (tiny random UNet)."""
    from sdxl.models import build_unet

    final = os.path.join(root, "runs", stage_name, "final")
    build_unet("tiny", "base", seed=7).save_pretrained(os.path.join(final, "ema"), safe_serialization=True)
    info = {"stage": stage_name, "step": 3, "preset": "tiny"}
    if run_id:
        info["mlflow_run_id"] = run_id
    with open(os.path.join(final, "info.json"), "w") as f:
        json.dump(info, f)
    return os.path.join(final, "ema")


@pytest.mark.slow  # samples 2 scales × 4 images and writes two MLflow runs: ~20 s alone, longer on a loaded box
def test_stage_scores_every_guidance_scale_and_logs_to_both_runs(tmp_path):
    root = str(tmp_path / "root")
    write_dataset(os.path.join(root, "data", "default"), n=20, size=40)
    cfg = eval_config(root, **FAST)
    with stage_run(cfg, "pretrain256") as training:  # the run a training stage would have logged into
        training_run = training.run_id
    _fake_final(root, "pretrain256", training_run)
    make_ctx = stage_context(cfg)
    with stage_run(cfg, "evaluate") as tracker:
        summary = stage.run(cfg, make_ctx(tracker))
        eval_run = tracker.run_id

    assert summary["checkpoint"] == "pretrain256/final/ema"
    assert summary["feature_weights"] == "random (plumbing only)" and summary["clip_weights"].startswith("random")
    assert summary["reference_rejects"] <= 1 and summary["num_references"] >= 2
    assert [row["guidance_scale"] for row in summary["rows"]] == [1.5, 5.0]
    for row in summary["rows"]:
        assert row["fid"] >= 0 and 0 <= row["clip_score"] <= 100 and row["inception_score"] >= 1 - 1e-6
    out = summary["output_dir"]
    for name in ("results.csv", "results.md", "fid_vs_clip.png", "summary.json", "samples_cfg5.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "results.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("guidance_scale,fid,clip_score") and len(lines) == 3

    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    for run_id in (eval_run, training_run):
        logged = client.get_run(run_id).data.metrics
        assert logged["fid_cfg5"] == pytest.approx(summary["rows"][1]["fid"])
        assert logged["clip_score_cfg1.5"] == pytest.approx(summary["rows"][0]["clip_score"])
        assert "is_cfg5" in logged
        history = client.get_metric_history(run_id, "eval_guidance_scale")
        assert sorted((m.step, m.value) for m in history) == [(0, 1.5), (1, 5.0)]
        artifacts = [a.path for a in client.list_artifacts(run_id, "evaluate/pretrain256_final_ema")]
        assert any(p.endswith("fid_vs_clip.png") for p in artifacts)
    assert summary["logged_to_training_run"] == training_run


def test_checkpoint_resolution(tmp_path):
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrain256/final/ema"):
        generate.resolve_checkpoint(None, root)
    assert generate.resolve_checkpoint(None, root, allow_random=True).folder is None
    ema = _fake_final(root, "pretrain512", "abc123")
    found = generate.resolve_checkpoint(None, root)
    assert found.folder == ema and found.training_run_id == "abc123"
    # A relative final/ folder under the root resolves to its ema/.
    assert generate.resolve_checkpoint("runs/pretrain512/final", root).folder == ema
    with pytest.raises(FileNotFoundError, match="evaluate.checkpoint"):
        generate.resolve_checkpoint(str(tmp_path / "nowhere"), root)


@pytest.mark.slow  # creates an MLflow SQLite registry (~10 s)
def test_checkpoint_from_a_registered_model_version(tmp_path):
    root = str(tmp_path)
    ema = _fake_final(root, "pretrain256", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, ema, "final/ema")
    client.create_registered_model("base")
    client.create_model_version("base", source=f"{run.info.artifact_uri}/final/ema", run_id=run.info.run_id)
    ref = generate.resolve_checkpoint("models:/base/1", root, tracking_uri=uri)
    assert os.path.isfile(os.path.join(ref.folder, "diffusion_pytorch_model.safetensors"))
    assert ref.training_run_id == run.info.run_id


def test_heldout_split_is_stable_and_near_the_fraction(tmp_path):
    keys = [f"k/{i}" for i in range(4000)]
    share = sum(heldout.is_heldout(k, 0.1) for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    assert [heldout.is_heldout(k, 0.1) for k in keys[:50]] == [heldout.is_heldout(k, 0.1) for k in keys[:50]]
    dataset = str(tmp_path / "ds")
    rows = write_dataset(dataset, n=12, size=32)
    split = heldout.heldout_samples(dataset, 0.5)
    assert 0 < len(split.rows) < 12
    assert split.prompts == [r["caption"] for r in rows if heldout.is_heldout(r["key"], 0.5)]
    images, rejects = heldout.load_reference_images(split, 24)
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24)
    assert images.shape[0] + len(rejects) == len(split.rows)
    with pytest.raises(ValueError, match="evaluate.val_fraction"):
        heldout.heldout_samples(dataset, 0.0)


def test_evaluate_in_training_with_a_sampler_callable():
    cfg = eval_config("/unused")
    gen = torch.Generator().manual_seed(0)
    references = torch.rand(6, 3, 32, 32, generator=gen)

    def sampler(model, step):
        assert step == 10
        return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(step))

    out = stage.evaluate_in_training(sampler, None, 10, cfg, reference_images=references,
                                     prompts=["a", "b", "c", "d"])
    assert set(out) == {"eval/fid", "eval/is", "eval/clip_score"}
    assert out["eval/fid"] >= 0 and 0 <= out["eval/clip_score"] <= 100
    same = stage.evaluate_in_training(sampler, None, 10, cfg, reference_images=references, prompts=["x"])
    assert "eval/clip_score" not in same and same["eval/fid"] == pytest.approx(out["eval/fid"])
    with pytest.raises(TypeError, match="task_like"):
        stage.evaluate_in_training(object(), None, 1, cfg, reference_images=references)


def test_evaluate_in_training_with_a_task_and_the_datasets_heldout_images(tmp_path):
    from PIL import Image

    dataset = str(tmp_path / "ds")
    write_dataset(dataset, n=16, size=32)
    cfg = eval_config(str(tmp_path), val_fraction=0.5)
    cfg.loader.dataset_dir = dataset

    class Task:  # the part of a TrainTask the evaluation uses
        def sample_images(self, model, step):
            return [Image.new("RGB", (24, 24), (40 * i, 90, 200)) for i in range(4)]

    out = stage.evaluate_in_training(Task(), None, 5, cfg)  # prompts: the 4 default sample prompts
    assert set(out) == {"eval/fid", "eval/is", "eval/clip_score"} and out["eval/fid"] >= 0


def test_scores_do_not_depend_on_how_images_are_batched():
    scorers = stage.build_scorers(eval_config("/unused").evaluate)
    images = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt {i % 3}" for i in range(6)]
    real_pool = torch.randn(8, scorers.net.dims["pool"], generator=torch.Generator().manual_seed(1)).double()
    whole, kept_whole = stage.score_batches(scorers, [(images, prompts)], real_pool, keep=4)
    split, kept_split = stage.score_batches(scorers, [(images[:2], prompts[:2]), (images[2:], prompts[2:])],
                                            real_pool, keep=4)
    assert kept_whole.shape[0] == kept_split.shape[0] == 4 and torch.equal(kept_whole, kept_split)
    for key in ("fid", "clip_score", "inception_score"):
        assert whole[key] == pytest.approx(split[key], rel=1e-5), key
    assert whole["num_images"] == 6


def test_unknown_kind_is_named(tmp_path):
    cfg = eval_config(str(tmp_path), kind="refiner")
    with pytest.raises(ValueError, match="evaluate.kind"):
        stage.run(cfg, stage_context(cfg)(None))
