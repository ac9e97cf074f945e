"""Join a Ray cluster or start an embedded one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Set before Ray starts so that every worker inherits them: no usage reports, no hub downloads by accident in tests.
_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(ray_cfg) -> str:
    """Join ``ray.address`` or ``$RAY_ADDRESS`` (set by `ray job submit`), else start a local Ray on 127.0.0.1.

    Returns "joined" or "embedded".
    """
    import ray

    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return "joined"
    address = ray_cfg.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address)
        return "joined"
    log.info("starting an embedded local Ray")
    ray.init(
        address="local",
        num_cpus=ray_cfg.get("num_cpus"),
        num_gpus=ray_cfg.get("num_gpus"),
        include_dashboard=bool(ray_cfg.get("include_dashboard", False)),
        dashboard_host=ray_cfg.get("dashboard_host", "127.0.0.1"),
    )
    return "embedded"
