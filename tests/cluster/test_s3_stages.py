"""The pipeline on an object-store root: `paths.root=s3://<bucket>/root` against moto's S3 server on 127.0.0.1.

Data stages → a short training stage → `stage=generate` serving the trained checkpoint, each through the CLI. MLflow stays a
local SQLite store (the default for a remote root: ~/.cache/sdxl-pipeline/mlflow.db, here under a private HOME) and
its artifacts go to s3 under the root.
"""

from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
import pytest
from PIL import Image

from tests.cluster.helpers import (
    REPO,
    SERVE_SMALL,
    TINY_DATA,
    check_dataset,
    child_env,
    demo_keys,
    free_port,
    make_demo_source,
    mlflow_runs,
    require_stage,
    run_stage,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]
N_IMAGES = 10
STAGE_TIMEOUT_S = 420
PROMPTS = ["a red circle in the center on a blue background", "a yellow square in the top left"]
SIZE, STEPS, SEED = 32, 2, 5


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    """A bucket of this module's own, a local demo source, and a private HOME for the default MLflow store."""
    import boto3

    base = tmp_path_factory.mktemp("s3-stages")
    bucket = f"sdxl-cluster-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["env"]["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    home = base / "home"
    home.mkdir()
    return {"bucket": bucket, "root": f"s3://{bucket}/root", "source": make_demo_source(base / "src", N_IMAGES),
            "home": home, "logs": base / "logs", "env": child_env({"HOME": str(home)}),
            "tracking_uri": f"sqlite:///{home / '.cache' / 'sdxl-pipeline' / 'mlflow.db'}",
            "endpoint": s3_server["env"]["AWS_ENDPOINT_URL"]}


def _object_keys(s3_run, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_run["endpoint"])
    keys, token = [], None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=s3_run["bucket"], Prefix=prefix, **extra)
        keys += [item["Key"] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


@pytest.fixture(scope="module")
def s3_data(s3_run):
    args = [*TINY_DATA, f"paths.root={s3_run['root']}", f"ingest.source={s3_run['source']}", "ingest.chunk_size=4"]
    return run_stage("data", args, s3_run["logs"] / "data.log", s3_run["env"], STAGE_TIMEOUT_S)


def test_data_stages_write_the_dataset_to_s3(s3_run, s3_data):
    summary = s3_data.check()
    assert summary["dataset_dir"] == f"{s3_run['root']}/data/default"
    counts = check_dataset(summary["dataset_dir"], demo_keys(s3_run["source"]))
    assert counts["kept"] > 0
    # Nothing of the dataset landed on the local disk under a folder literally named "s3:".
    assert not os.path.exists("s3:") and not os.path.exists(os.path.join(str(s3_run["home"]), "s3:"))
    runs = mlflow_runs(s3_run["tracking_uri"], "data")
    assert runs and runs[0].info.status == "FINISHED"
    assert runs[0].info.artifact_uri.startswith(f"{s3_run['root']}/mlartifacts/")
    assert any(key.endswith("summary.json") for key in _object_keys(s3_run, "root/mlartifacts/"))


@pytest.fixture(scope="module")
def s3_training(s3_run, s3_data):
    require_stage("pretrain256")
    s3_data.check()
    # train.seed=7: the trained UNet starts from another random init than the one `stage=serve` builds without a
    # checkpoint (serve.seed = train.seed = 0 there), so an image shows which weights were served.
    args = ["preset=tiny", "ray.num_cpus=2", f"paths.root={s3_run['root']}", "train.max_steps=2",
            "train.checkpoint_every=2", "cluster.num_workers=1", "train.seed=7"]
    return run_stage("pretrain256", args, s3_run["logs"] / "pretrain256.log", s3_run["env"], STAGE_TIMEOUT_S)


def test_training_checkpoints_and_final_weights_go_to_s3(s3_run, s3_training):
    from pipeline import storage

    s3_training.check()
    keys = _object_keys(s3_run, "root/runs/pretrain256/")
    assert any("/checkpoint_" in key for key in keys), keys[:20]
    info = storage.read_json(f"{s3_run['root']}/runs/pretrain256/final/info.json")
    assert info["step"] == 2
    assert any(key.startswith("root/runs/pretrain256/final/ema/") for key in keys)
    runs = mlflow_runs(s3_run["tracking_uri"], "pretrain256")
    assert runs and runs[0].info.status == "FINISHED" and "loss" in runs[0].data.metrics


def _in_process_image(overrides: list[str], body: dict) -> np.ndarray:
    """The first image the serving core makes in this process for ``body``, with the config the CLI composes."""
    from hydra import compose, initialize_config_dir

    from benchmarks.bench_serve import in_process_generator

    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["preset=tiny", "stage=serve", "serve.torch_threads=1",
                                                       *overrides])
    return np.asarray(in_process_generator(cfg)(body), dtype=np.int16)


def _png_pixels(uri: str) -> np.ndarray:
    from pipeline import storage

    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"), dtype=np.int16)


def test_generate_serves_the_s3_checkpoint_and_saves_the_images_and_a_grid(s3_run, s3_training):
    """`stage=generate` as a user runs it: the CLI starts the Serve app on a loopback port, posts each prompt over
    HTTP, saves the PNGs, a grid and prompts.json under <root>/generated/ (here in the bucket), and stops the app.

    The relative serve.checkpoint exists only in the bucket: each replica copies it from s3, and a folder it cannot
    find fails the replica (and so the stage). Each saved image is the one the serving core makes in-process for the
    same request from the same checkpoint, and not the preset's random-init image."""
    from pipeline import storage

    require_stage("generate")
    s3_training.check()
    model = [f"paths.root={s3_run['root']}", "serve.checkpoint=runs/pretrain256/final", "serve.refiner_ensemble=false"]
    args = ["preset=tiny", "ray.num_cpus=2", *model, "serve.host=127.0.0.1", f"serve.port={free_port()}",
            *SERVE_SMALL, f"generate.prompts={json.dumps(PROMPTS)}", "generate.refiner=false",
            f"generate.width={SIZE}", f"generate.height={SIZE}", f"generate.steps={STEPS}", f"generate.seed={SEED}"]
    run_stage("generate", args, s3_run["logs"] / "generate.log", s3_run["env"], STAGE_TIMEOUT_S).check()

    out = f"{s3_run['root']}/generated"
    files = [f"{out}/{i:03d}_0.png" for i in range(len(PROMPTS))]
    assert storage.read_json(f"{out}/prompts.json") == {"prompts": PROMPTS, "files": files}
    saved = []
    for i, (prompt, uri) in enumerate(zip(PROMPTS, files)):
        body = {"prompt": prompt, "width": SIZE, "height": SIZE, "steps": STEPS, "seed": SEED + i}
        image = _png_pixels(uri)
        from_checkpoint = _in_process_image(model, body)
        assert image.shape == from_checkpoint.shape == (SIZE, SIZE, 3)
        assert np.abs(image - from_checkpoint).max() <= 1, f"{uri} is not the served image"  # a float may round
        if i == 0:
            random_init = _in_process_image([f"paths.root={s3_run['root']}"], body)
            assert np.abs(image - random_init).mean() > 2, "the random-init image was served, not the checkpoint"
        saved.append(image)
    assert np.abs(saved[0] - saved[1]).mean() > 1  # two prompts and seeds: two different images
    grid = _png_pixels(f"{out}/grid.png")
    assert grid.shape == (SIZE, SIZE * len(PROMPTS), 3)
    assert np.array_equal(grid[:, :SIZE], saved[0]) and np.array_equal(grid[:, SIZE:], saved[1])
