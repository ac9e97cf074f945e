"""Every registered stage composes with both presets, and the CLI answers --help without starting anything."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.registry import STAGES, help_text

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "conf")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize("preset", ["tiny", "full"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_composes(stage, preset, tmp_path):
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"stage={stage}", f"preset={preset}", f"paths.root={tmp_path}"])
    # Resolving every interpolation catches typos in stage and preset files.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["preset"] == preset
    assert resolved["paths"]["root"] == str(tmp_path)


def test_unknown_preset_is_a_clear_error(tmp_path):
    from hydra.errors import MissingConfigException

    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base=None):
        with pytest.raises(MissingConfigException, match="preset"):
            compose(config_name="config", overrides=["preset=huge"])


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "pipeline/run.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == help_text().strip()
    for name in STAGES:
        assert f"  {name}" in out


def test_unknown_stage_names_the_options(tmp_path):
    proc = subprocess.run([sys.executable, "pipeline/run.py", "stage=nope", f"paths.root={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "stage" in proc.stderr and "nope" in proc.stderr
