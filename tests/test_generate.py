"""`stage=generate` as a user runs it: the CLI starts the Serve app on a loopback port, posts each prompt over HTTP,
saves the PNGs, a grid and prompts.json under <root>/generated/, and stops the app. Each saved image is the one the
serving core makes in-process for the same request on the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.cluster.helpers import REPO, SERVE_SMALL, free_port, log_tail, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.integration]
PROMPTS = ["a red circle in the center on a blue background", "a yellow square in the top left"]
SIZE, STEPS, SEED = 32, 2, 5


def _overrides(root) -> list[str]:
    return ["preset=tiny", f"paths.root={root}", "ray.num_cpus=2", "serve.host=127.0.0.1", f"serve.port={free_port()}",
            *SERVE_SMALL, "serve.refiner_ensemble=false", f"generate.prompts={json.dumps(PROMPTS)}",
            "generate.refiner=false", f"generate.width={SIZE}", f"generate.height={SIZE}", f"generate.steps={STEPS}",
            f"generate.seed={SEED}"]


def test_generate_saves_the_served_images_and_a_grid(tmp_path):
    from benchmarks.bench_serve import in_process_generator

    root = tmp_path / "root"
    log = tmp_path / "generate.log"
    run = run_stage("generate", _overrides(root), log, timeout_s=600)
    assert run.returncode == 0, log_tail(log, 6000)

    out = root / "generated"
    listing = json.loads((out / "prompts.json").read_text())
    files = [out / f"{i:03d}_0.png" for i in range(len(PROMPTS))]
    assert listing == {"prompts": PROMPTS, "files": [str(f) for f in files]}
    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["stage=generate", *_overrides(root)])
    generate = in_process_generator(cfg)
    saved = []
    for i, (prompt, path) in enumerate(zip(PROMPTS, files)):
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        expected = generate({"prompt": prompt, "width": SIZE, "height": SIZE, "steps": STEPS, "seed": SEED + i})
        assert image.shape == expected.shape == (SIZE, SIZE, 3)
        assert np.abs(image - expected.astype(np.int16)).max() <= 1, f"{path.name} is not the served image"
        saved.append(image)
    assert np.abs(saved[0] - saved[1]).mean() > 1  # two prompts and seeds: two different images
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"), dtype=np.int16)
    assert grid.shape == (SIZE, SIZE * len(PROMPTS), 3)
    assert np.array_equal(grid[:, :SIZE], saved[0]) and np.array_equal(grid[:, SIZE:], saved[1])
