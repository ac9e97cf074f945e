"""Tests of the data stages (stages/data). `data_cfg` composes their config sections from pipeline/conf."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parents[2] / "pipeline" / "conf"
SECTIONS = ("ingest", "filter", "caption", "buckets")


def data_cfg(**overrides: object) -> DictConfig:
    """The four data sections from their default.yaml, scoring off, with dotted-key overrides applied."""
    cfg = OmegaConf.create({name: OmegaConf.load(CONF / name / "default.yaml") for name in SECTIONS})
    cfg.scoring = {"enabled": False}
    cfg.ingest.concurrency = 1  # one reader: the test machine has two cores
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def read_options(**overrides: object):
    """The streaming pass's read options for ``data_cfg(**overrides)``."""
    from stages.data import download, process, stream

    cfg = data_cfg(**overrides)
    return stream.ReadOptions(process.SampleOptions.from_config(cfg),
                              download.DownloadOptions.from_config(cfg.ingest.download))
