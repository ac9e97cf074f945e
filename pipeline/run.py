"""The entry point: `python pipeline/run.py stage=<name> [preset=tiny|full] [key=value ...]`.

Without a cluster address it starts an embedded local Ray; under `ray job submit` (or with RAY_ADDRESS) it joins
that cluster. Run with --help for the list of stages.
"""

from __future__ import annotations

import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.dispatch import execute  # noqa: E402
from pipeline.registry import help_text  # noqa: E402


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    stage = hydra_cfg.runtime.choices["stage"]
    result = execute(stage, cfg, overrides=list(hydra_cfg.overrides.task))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(help_text())
        sys.exit(0)
    main()
