"""The notebooks run top to bottom (nbclient) on outputs made here: a 60-image demo dataset through the data stages
and an MLflow run with a few metrics and a logged sample grid."""

from __future__ import annotations

import os

import nbformat
import pytest
from omegaconf import OmegaConf

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
pytestmark = pytest.mark.slow  # a Ray data run plus three kernels: about a minute


@pytest.fixture(scope="module")
def pipeline_root(ray_local, tmp_path_factory) -> str:
    import io

    from PIL import Image

    from pipeline.context import StageContext
    from pipeline.tracking import stage_run
    from stages.data import pipeline as data_pipeline
    from stages.data.demo_data import generate_demo_dataset
    from tests.data import data_cfg

    tmp = tmp_path_factory.mktemp("notebooks")
    root = str(tmp / "root")
    generate_demo_dataset(str(tmp / "demo"), n=60, seed=0, max_side=320, folder_size=30)
    cfg = data_cfg(**{"ingest.source": str(tmp / "demo"), "buckets.resolution": 256, "buckets.multiple": 8})
    data_pipeline.run(cfg, StageContext(root=root, stage="data", dataset="demo"))

    conf = os.path.join(os.path.dirname(__file__), "..", "pipeline", "conf")
    ml_cfg = OmegaConf.create({"paths": {"root": root}, "mlflow": OmegaConf.load(os.path.join(conf, "mlflow",
                                                                                             "default.yaml"))})
    with stage_run(ml_cfg, "pretrain256") as tracker:
        for step in range(5):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4 * step / 4}, step=step)
        grid = tmp / "step_000004.png"
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
        grid.write_bytes(buf.getvalue())
        tracker.log_artifact(str(grid), "samples")
    return root


@pytest.mark.parametrize("name", ["01_data_exploration", "02_training_curves", "03_samples"])
def test_notebook_runs(name, pipeline_root, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    monkeypatch.setenv("SDXL_ROOT", pipeline_root)
    monkeypatch.setenv("SDXL_DATASET", "demo")
    monkeypatch.setenv("SDXL_RESOLUTION", "32")
    monkeypatch.setenv("SDXL_STEPS", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    nbformat.write(nb, str(tmp_path / f"{name}.ipynb"))  # kept for inspection when a later assertion fails
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    if name == "01_data_exploration":
        assert "kept" in text and "share_either_below" in text
    elif name == "02_training_curves":
        assert "metrics over 1 runs" in text
    else:
        assert "1 logged sample grid(s)" in text and "weights: random init" in text
